"""``scripts/docs_pictures.py``: the README's viewer.png and curves.png, drawn from a run (here a small one: the
viewer tests' rollouts, written with the tiny model's tokenizer, and the report tests' metrics). Chromium is
needed for the screenshot (``apt-get install -y chromium``); without it that test is skipped."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from r3l_lightning.trajectory import ChatTokenizer
from test_report import ROWS, write_metrics
from test_viewer import write_run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "docs_pictures.py"


def load_script():
    spec = importlib.util.spec_from_file_location("docs_pictures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_tokenizer) -> Path:
    run_dir = tmp_path_factory.mktemp("pictures") / "runs" / "job"
    log_dir = run_dir / "csv" / "version_0"
    write_run(ChatTokenizer(tiny_tokenizer, [tiny_tokenizer.eos_token_id]), log_dir)
    write_metrics(log_dir / "metrics.csv", ROWS)
    return run_dir


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install -y chromium)")
def test_script_writes_both_pictures_from_a_run(small_run, tmp_path):
    from PIL import Image, ImageStat

    out = Path(os.environ.get("R3L_DOCS_PICTURES", tmp_path / "docs"))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(small_run), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["wrote", str(out / "viewer.png"), "wrote", str(out / "curves.png")]
    viewer = Image.open(out / "viewer.png")
    assert viewer.size == (1400, 1100)
    # a drawn page, not a blank one: its grey levels vary
    assert ImageStat.Stat(viewer.convert("L")).stddev[0] > 10
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert not list(small_run.rglob("rollouts.html"))  # the viewer page went to a temporary folder, not the run


def test_missing_chromium_names_the_fix(small_run, tmp_path, capsys):
    script = load_script()
    with pytest.raises(FileNotFoundError, match="apt-get install -y chromium"):
        script.find_chromium("no-such-browser")
    with pytest.raises(SystemExit) as exit_:
        script.main([str(small_run), "--out", str(tmp_path), "--chromium", "no-such-browser"])
    assert exit_.value.code == 2 and "no Chromium found (no-such-browser)" in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()  # nothing half-written


def test_a_run_without_rollouts_is_refused(tmp_path, capsys):
    script = load_script()
    chromium = sys.executable  # never reached: the viewer refuses the run first
    with pytest.raises(FileNotFoundError, match="no rollout records"):
        script.docs_pictures(tmp_path, tmp_path / "out", chromium)
    assert subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--chromium", sys.executable],
                          capture_output=True, text=True, timeout=120).returncode == 2
