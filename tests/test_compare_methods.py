"""`experiments/compare_methods.py` end to end on the tiny model: every method runs under the same rollout-token
budget, stops on it, and the table, the CSV and the picture are written."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "experiments" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_comparison_on_the_tiny_model(tmp_path):
    compare = load_script()
    budget = 150  # one tiny-model epoch generates ~100-200 rollout tokens
    compare.main(["--quick", "--config", str(ROOT / "configs" / "smoke" / "tiny.yaml"), "--out", str(tmp_path),
                  "--methods", "R3L (reference reflector)", "GRPO", "--budget", str(budget), "--eval_every", "1", "--eval_tasks", "4",
                  "--eval_max_new_tokens", "8"])
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["method"] for r in rows if r["method"] == "initial policy"] == ["initial policy"]  # once per seed
    for method in ("R3L (reference reflector)", "GRPO"):
        tokens = [float(r["rollout_tokens"]) for r in rows if r["method"] == method]
        assert tokens == sorted(tokens) and tokens[-1] >= budget  # evaluated every epoch until the budget ran out
        assert len(tokens) < 1000  # the budget, not max_epochs, ended the run
        assert all(0.0 <= float(r["eval_success"]) <= 1.0 for r in rows if r["method"] == method)
    table = (tmp_path / "results.md").read_text()
    assert "| R3L (reference reflector) |" in table and "| GRPO |" in table and "| initial policy |" in table
    r3l_row = next(line for line in table.splitlines() if line.startswith("| R3L (reference reflector) |"))
    assert "/" in r3l_row.split("|")[5]  # informative reflections k/n, summed over the run's epochs
    assert (tmp_path / "eval_success.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reflect_retry_rates_are_summed_over_every_epoch_of_every_seed():
    compare = load_script()
    runs = [{"counts": {"informative_reflections": 3.0, "reflections": 4.0, "retries_improved": 1.0, "retries": 2.0}},
            {"counts": {"informative_reflections": 1.0, "reflections": 4.0, "retries_improved": 0.0, "retries": 2.0}}]
    assert compare.rate(runs, "informative reflections") == "4/8 = 0.50"
    assert compare.rate(runs, "retries improved") == "1/4 = 0.25"
    assert compare.rate([{"counts": {}}], "retries improved") == ""  # GRPO: no retries at all
