"""Rollout records (what every explorer hands out), the rollout log files, the logger tables and the console."""

from __future__ import annotations

import json
import logging
import logging.config
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from r3l_lightning.callbacks.exploration import epoch_summary
from r3l_lightning.console import VLLM_LOGGING_CONFIG
from r3l_lightning.explore import DAPOExplorer, RAFTExplorer, R3LExplorer
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.logger_tables import CELL_CHARS, COLUMNS, describe_task, markdown_table, table_rows
from r3l_lightning.rollout_log import RolloutLog, clip_strings, save_rollouts
from scripted import GuessEnv, GuessTasks, ScriptedEngine
from test_explorer import HIGH, LOW, MID, REFLECTION, critique_run, script


def explore(chat, explorer, responder, tasks=1, max_turns=3):
    engine = ScriptedEngine(responder, chat.tokenizer, chat.tokenizer.eos_token_id)
    source = GuessTasks(tasks)
    return explorer.explore([source[i] for i in range(tasks)], RolloutContext(GuessEnv(max_turns), engine, chat))


def tokens(chat, text: str) -> int:
    """Sampled tokens of a scripted response: the text's tokens plus the end-of-turn token."""
    return len(chat.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


def test_r3l_record_holds_trajectories_reflection_pivot_retry_and_every_sample(tiny_chat):
    result = explore(tiny_chat, R3LExplorer(group_size=4), script(json.dumps(REFLECTION)), tasks=2)
    assert [r["task_id"] for r in result.records] == ["guess-0", "guess-1"]
    record = json.loads(json.dumps(result.records[0]))  # JSON-ready as it is
    assert record["task"] == {"rewards": {"apple": 1.0}}
    assert len(record["attempts"]) == 2  # N/2 base trajectories
    attempt = record["attempts"][0]
    base = attempt["base"]
    assert (base["reward"], base["turns"], base["truncated"], base["error"]) == (0.0, 3, False, None)
    assert [m["role"] for m in base["messages"]] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2
    assert base["observations"][0] == "Guess the secret word." and base["feedback"] == "Final: 'pear' is wrong."
    assert attempt["reflection"] == {"text": json.dumps(REFLECTION), "report": REFLECTION, "invalid_reason": None,
                                     "author": "policy", "informative": True, "uninformative_reason": None}
    assert attempt["pivot"] == 1
    assert attempt["retry_same_as_base"] is False  # "apple" at the pivot, where the base said "pear"
    retry = attempt["retry"]
    assert retry["reward"] == 1.0 and retry["turns"] == 2  # step 0 replayed, step 1 "apple"
    assert [m.get("guidance", False) for m in retry["messages"]].count(True) == 1
    pear, apple, reflection = tokens(tiny_chat, "pear"), tokens(tiny_chat, "apple"), tokens(tiny_chat, json.dumps(REFLECTION))
    # group rewards [0, 1, 0, 1]: mean .5, unbiased σ = sqrt(1/3) = .5773503, ε = 1e-6
    # → base (0 - .5)/(σ + ε) = -.8660239; R_max → α = 3
    # trainable tokens: base steps 1 and 2 (step 0 precedes the pivot), the retry's step 1, the whole reflection
    expected = [("base", 0.0, -0.8660239, 2 * pear), ("distill", 1.0, 3.0, apple),
                ("sft_reflect", None, 1.0, reflection), ("sft_retry", 1.0, 1.0, apple)]
    got = [(s["kind"], s["reward"], s["advantage"], s["trainable_tokens"]) for s in attempt["samples"]]
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected], abs=1e-6)
    assert [g[3] for g in got] == [e[3] for e in expected]


def test_invalid_reflection_is_recorded_with_its_reason_and_no_retry(tiny_chat):
    result = explore(tiny_chat, R3LExplorer(group_size=4), script("I think it went badly"))
    attempt = result.records[0]["attempts"][0]
    assert attempt["reflection"] == {"text": "I think it went badly", "report": None, "invalid_reason": "no_json",
                                     "author": "policy", "informative": False, "uninformative_reason": None}
    assert attempt["pivot"] is None and attempt["retry"] is None and attempt["retry_same_as_base"] is None
    assert [(s["kind"], s["advantage"]) for s in attempt["samples"]] == [("base", 0.0)]  # equal rewards: no signal


def test_group_raft_and_critique_records_attribute_samples_to_their_trajectories(tiny_chat):
    dropped = explore(tiny_chat, DAPOExplorer(group_size=3, overlong_penalty=0.0), lambda p: "pear")
    assert [a["samples"] for a in dropped.records[0]["attempts"]] == [[], [], []]  # all equal: group dropped
    assert all(a["reflection"] is None and a["retry"] is None for a in dropped.records[0]["attempts"])

    answers = iter(["apple", "pear", "pear", "apple"])
    raft = explore(tiny_chat, RAFTExplorer(group_size=4), lambda p: next(answers), max_turns=1)
    assert [[s["kind"] for s in a["samples"]] for a in raft.records[0]["attempts"]] == \
        [["sft_success"], [], [], ["sft_success"]]

    # pear, plum, pear → refinements plum (.5), apple (1), plum (.5): the best is the 2nd attempt's
    result, _ = critique_run(tiny_chat, ["pear", "plum", "pear"], {"pear": "plum", "plum": "apple"})
    attempts = result.records[0]["attempts"]
    assert [[s["kind"] for s in a["samples"]] for a in attempts] == [["base"], ["base", "refinement"], ["base"]]
    advantages = [s["advantage"] for a in attempts for s in a["samples"]]
    assert advantages == pytest.approx([LOW, MID, HIGH, LOW], abs=1e-5)  # rewards 0, .5, 1, 0 (test_explorer)
    assert [a["retry"]["reward"] for a in attempts] == [0.5, 1.0, 0.5]  # every refinement is shown


def test_rollout_log_settings_name_the_field_when_wrong():
    with pytest.raises(ValueError, match=r"data\.rollout_log\.max_chars must be an integer >= 0"):
        RolloutLog(max_chars=-1)
    with pytest.raises(ValueError, match=r"data\.rollout_log\.every_n_epochs"):
        RolloutLog(every_n_epochs=True)


def test_clip_strings_keeps_the_head_and_says_how_much_was_cut():
    record = {"a": "x" * 10, "b": ["yyyy", {"c": "z" * 7}], "n": 3.5}
    assert clip_strings(record, 4) == {"a": "xxxx[… 6 chars cut]", "b": ["yyyy", {"c": "zzzz[… 3 chars cut]"}], "n": 3.5}
    assert clip_strings(record, 0) == record


def fake_trainer(log_dir: Path, loggers=()) -> SimpleNamespace:
    return SimpleNamespace(log_dir=str(log_dir), default_root_dir=str(log_dir), world_size=1, is_global_zero=True,
                           loggers=list(loggers), global_step=7)


def test_save_rollouts_writes_one_line_per_group_bounded_and_atomically(tmp_path, tiny_chat):
    records = explore(tiny_chat, R3LExplorer(group_size=4), script(json.dumps(REFLECTION)), tasks=3).records
    config = RolloutLog(every_n_epochs=2, max_groups=2, max_chars=40)
    trainer = fake_trainer(tmp_path)
    assert save_rollouts(trainer, config, "train", 1, records) is None  # epoch 1: not a multiple of 2
    path = save_rollouts(trainer, config, "train", 2, records)
    assert path == tmp_path / "rollouts" / "epoch_2.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["task_id"], r["split"], r["epoch"]) for r in lines] == [("guess-0", "train", 2), ("guess-1", "train", 2)]
    assert lines[0]["attempts"][0]["reflection"]["text"] == json.dumps(REFLECTION)[:40] + \
        f"[… {len(json.dumps(REFLECTION)) - 40} chars cut]"
    eval_path = save_rollouts(trainer, config, "eval", 3, records)  # evaluation rollouts whenever evaluation runs
    assert eval_path.name == "eval_3.jsonl"
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["epoch_2.jsonl", "eval_3.jsonl"]  # no temp files
    assert save_rollouts(trainer, config, "train", 4, []) is None  # an explorer that hands out no records
    assert save_rollouts(trainer, RolloutLog(every_n_epochs=0), "eval", 0, records) is None  # log off


def test_table_rows_carry_the_task_every_turn_and_the_report(tiny_chat):
    records = explore(tiny_chat, R3LExplorer(group_size=4), script(json.dumps(REFLECTION)), tasks=1).records
    row = dict(zip(COLUMNS, table_rows([dict(records[0], epoch=3)])[0]))
    retry = row.pop("retry_response")
    assert row == {
        "epoch": 3, "task_id": "guess-0", "task": 'rewards={"apple": 1.0}', "attempt": 0,
        "base_reward": 0.0, "base_turns": 3,
        "base_response": "turn 1: pear\n→ 'pear' is wrong.\nturn 2: pear\n→ 'pear' is wrong.\nturn 3: pear",
        "reflection": "failure",
        "report": "trajectory_summary: guessed pear three times\n"
                  "root_cause_analysis: why wrong? kept the same guess; why? ignored feedback\n"
                  "improvement_suggestion: change the guess after negative feedback\nretry_from_step: 1",
        "pivot": 1, "retry_reward": 1.0,
        "samples": "base A=-0.87 (6 tok); distill A=+3.00 (2 tok); sft_reflect A=+1.00 (69 tok); sft_retry A=+1.00 (2 tok)",
    }
    # the retry: the base's first turn, the guidance (cut to the cell's length), then its own answer
    lines = retry.splitlines()
    assert lines[:3] == ["turn 1: pear", "→ 'pear' is wrong.", "guidance: Your previous attempt at this task had issues. "
                         "A review of it found:"] and lines[-1] == "turn 2: apple"
    assert "…" in retry and len(retry) < CELL_CHARS + 100


def test_table_cells_of_an_invalid_reflection_and_a_task_without_payload():
    base = {"messages": [{"role": "user", "content": "Sort 3 1 2"}, {"role": "assistant", "content": "1 2 3"}],
            "observations": ["Sort 3 1 2"], "reward": 1.0, "turns": 1}
    record = {"task_id": "t", "task": {}, "attempts": [{"base": base, "pivot": None, "retry": None, "samples": [],
                                                      "reflection": {"text": "x" * 400, "report": None,
                                                                     "invalid_reason": "no_json"}}]}
    row = dict(zip(COLUMNS, table_rows([record])[0]))
    assert (row["task"], row["base_response"], row["reflection"]) == ("Sort 3 1 2", "turn 1: 1 2 3", "invalid (no_json)")
    assert row["report"] == "x" * CELL_CHARS + "…"  # the head of what the reflection wrote
    assert describe_task({"numbers": [3, 4, 11], "target": 23}, base) == "numbers=[3, 4, 11] target=23"


def test_sample_tables_reach_tensorboard_under_one_tag_per_split(tmp_path, tiny_chat):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = explore(tiny_chat, R3LExplorer(group_size=4), script(json.dumps(REFLECTION)), tasks=2).records
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = fake_trainer(tmp_path, [logger])
    save_rollouts(trainer, RolloutLog(table_groups=1), "train", 0, records)
    trainer.global_step = 9
    save_rollouts(trainer, RolloutLog(table_groups=1), "train", 1, records)
    save_rollouts(trainer, RolloutLog(table_groups=1), "eval", 1, records)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert sorted(events.Tags()["tensors"]) == ["rollouts/eval/text_summary", "rollouts/train/text_summary"]
    train = events.Tensors("rollouts/train/text_summary")
    assert [e.step for e in train] == [7, 9]  # one tag, one step of its slider per epoch
    table = train[0].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    rows = table.splitlines()[2:]
    assert len(rows) == 2  # one group of two attempts
    assert rows[0].startswith("| 0 | guess-0 | rewards={\"apple\": 1.0} | 0 | 0 | 3 | turn 1: pear ↵ → 'pear' is wrong. ↵ "
                              "turn 2: pear ↵ → 'pear' is wrong. ↵ turn 3: pear | failure | trajectory_summary: ")


def test_markdown_cells_escape_pipes_and_line_breaks():
    assert markdown_table(["a"], [["x|y\nz"]]).splitlines()[2] == "| x\\|y ↵ z |"


def test_sample_tables_reach_wandb_offline(tmp_path, tiny_chat, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = explore(tiny_chat, R3LExplorer(group_size=4), script(json.dumps(REFLECTION)), tasks=1).records
    logger = WandbLogger(project="r3l-test", save_dir=str(tmp_path), offline=True)
    save_rollouts(fake_trainer(tmp_path, [logger]), RolloutLog(), "train", 0, records)
    logger.experiment.finish()
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/rollouts/train_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == COLUMNS
    rows = [dict(zip(COLUMNS, row)) for row in table["data"]]
    assert [row["task_id"] for row in rows] == ["guess-0", "guess-0"]
    assert (rows[0]["reflection"], rows[0]["retry_reward"]) == ("failure", 1.0)
    assert rows[0]["report"].startswith("trajectory_summary: guessed pear three times\n")


def test_epoch_summary_line():
    stats = {"base_success_rate": 0.3125, "reflections": 16.0, "invalid_reflections": 2.0, "retries": 12.0,
             "retries_improved": 5.0, "samples_distill": 12.0, "samples_retry": 0.0, "samples_sft_reflect": 5.0,
             "samples_sft_retry": 5.0, "time_explore_s": 17.2, "optimizer_steps": 2.0}
    assert epoch_summary(3, stats, 41.4) == ("epoch 3 | base 0.31 | reflections 16: valid 14 | retries 12 → improved 5"
                                             " | distill 12 sft 10 | explore 17 s | train 2 steps 41 s")
    # with the informative count: 14 parse, 3 of them say something a retry can act on
    stats.update(valid_reflections=14.0, informative_reflections=3.0)
    assert epoch_summary(3, stats, 41.4).startswith("epoch 3 | base 0.31 | reflections 16: valid 14, informative 3 |")
    group_stats = {"base_success_rate": 0.5, "samples_base": 8.0, "time_explore_s": 3.0, "optimizer_steps": 1.0}
    assert epoch_summary(0, group_stats, 2.0) == "epoch 0 | base 0.50 | explore 3 s | train 1 steps 2 s"
    # issue 20's counters: 3 of the 12 retries repeat the base at the pivot (rate 0.25); 10 of 16 groups have no
    # reward spread, 5 of 16 samples a nonzero advantage; 1 of the 2 steps trained nothing (every weight 0)
    stats.update(retry_same_as_base_rate=0.25, frac_reward_zero_std=0.625, frac_nonzero_advantage=0.3125)
    assert epoch_summary(3, stats, 41.4, no_signal_steps=1) == (
        "epoch 3 | base 0.31 | reflections 16: valid 14, informative 3 | retries 12 → improved 5, same as base 3"
        " | distill 12 sft 10 | zero-spread groups 0.62, nonzero adv 0.31 | explore 17 s"
        " | train 2 steps (1 without signal) 41 s")


def test_vllm_logging_config_shows_each_warning_once_and_every_error(monkeypatch):
    config = json.loads(VLLM_LOGGING_CONFIG.read_text())
    config["loggers"] = {"r3l-test-vllm": config["loggers"]["vllm"]}  # the real "vllm" logger stays untouched
    config["handlers"]["r3l_vllm"]["stream"] = "ext://sys.stdout"
    stream = StringIO()
    monkeypatch.setattr("sys.stdout", stream)
    logging.config.dictConfig(config)
    layer = logging.getLogger("r3l-test-vllm.model_executor.reload")
    for seconds in (1.5, 2.25, 3.0):  # one weight sync each
        layer.warning("%s: Failed to load weights", "VocabParallelEmbedding")  # a real failure: shown once
        layer.warning("%s: Failed to load weights", "RotaryEmbedding")  # a derived cache: dropped
        layer.warning("%s: Failed to load weights", "ParallelLMHead")  # tied to the embedding: dropped
        layer.info("Reloading and processing weights took %.2f seconds", seconds)
        layer.error("worker died: %s", seconds)
    logging.getLogger("r3l-test-vllm.platforms").warning("Triton is not installed. triton-cpu is expected on x86 CPUs.")
    lines = stream.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "VocabParallelEmbedding: Failed to load weights", "worker died: 1.5", "worker died: 2.25", "worker died: 3.0"]
    logging.getLogger("r3l-test-vllm").handlers.clear()
