"""ALFWorld environment checks (tests/alfworld_env_checks.py), run in their own pytest process (see isolated.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from isolated import assert_checks_pass

pytest.importorskip("alfworld")
pytest.importorskip("textworld")


def test_alfworld_env_checks_pass_in_a_separate_process():
    assert_checks_pass(Path(__file__).with_name("alfworld_env_checks.py"))
