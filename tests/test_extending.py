"""docs/extending.md's worked example end to end: the best-of-N explorer (``explore/best_of_n.py``), its overlay
(``configs/methods/best_of_n.yaml``) and this test. One epoch of ``r3l fit`` on the tiny model with a scripted
engine; what the method trained shows in the rollout log that ``r3l view`` reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from r3l_lightning.cli import cli_main
from r3l_lightning.engines.base import Completion, RolloutEngine, SamplingParams
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.viewer import find_log_dir, load_records, write_viewer

ROOT = Path(__file__).resolve().parents[1]

# one guess per sample, 4 samples per task: task 0 scores 0.5, 1, 1, 0 (its best: the shorter of the two
# successes, sample 2), task 1 scores 0.5, 0, 0, 0 (no success: nothing to train on)
ANSWERS = ["pear", "   apple", "apple", "plum", "pear", "plum", "plum", "plum"]


class ListedAnswersEngine(RolloutEngine):
    """Answers the prompts it is given with ``answers``, in order, one after the other."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.answered = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 constraints: list[Constraint | None] | None = None) -> list[list[Completion]]:
        out = []
        for _ in prompts:
            text = self.answers[self.answered % len(self.answers)]
            self.answered += 1
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.eos_token_ids[:1]
            out.append([Completion(ids, [-1.0] * len(ids), "stop") for _ in range(params.n)])
        return out


def test_best_of_n_trains_the_best_success_of_each_task_and_its_records_show_in_the_viewer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = {"class_path": f"{__name__}.ListedAnswersEngine", "init_args": {"answers": ANSWERS}}
    cli_main([
        "fit", "--config", str(ROOT / "configs" / "smoke" / "tiny.yaml"),
        "--config", str(ROOT / "configs" / "methods" / "best_of_n.yaml"),
        "--model.engine", json.dumps(engine),
        "--data.environment", "scripted.GuessEnv", "--data.environment.init_args.max_turns", "1",
        "--data.train_tasks", "scripted.GuessTasks", "--data.train_tasks.init_args.n", "2",
        "--data.train_tasks.init_args.rewards", json.dumps({"apple": 1.0, "pear": 0.5}),
        "--data.eval_tasks", "null", "--data.tasks_per_epoch", "2",
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", "r3l_lightning.callbacks.ExplorationCallback",
        "--trainer.callbacks.show_progress", "false",
    ])
    (metrics,) = (tmp_path / "run").glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert [float(r["explore/samples_sft_success"]) for r in rows if r.get("explore/samples_sft_success")] == [1.0]
    assert [float(r["explore/tasks_with_best"]) for r in rows if r.get("explore/tasks_with_best")] == [1.0]
    sft_losses = [float(r["train/sft_loss"]) for r in rows if r.get("train/sft_loss")]
    assert len(sft_losses) == 1 and sft_losses[0] > 0  # one optimizer step, on the one SFT sample

    records = load_records(find_log_dir(tmp_path / "run"))
    assert [r["task_id"] for r in records] == ["guess-0", "guess-1"]
    kept = [[s["kind"] for s in a["samples"]] for a in records[0]["attempts"]]
    assert kept == [[], [], ["sft_success"], []]
    assert records[0]["attempts"][2]["base"]["messages"][-1]["content"] == "apple"
    assert records[0]["attempts"][2]["samples"][0]["reward"] == 1.0
    assert all(not a["samples"] for a in records[1]["attempts"])
    page, groups = write_viewer(tmp_path / "run")
    assert groups == 2 and "sft_success" in page.read_text()
