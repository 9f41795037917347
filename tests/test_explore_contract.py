"""The explorer contract (explore/base.py): seeding and call counting by the base class, samples attached to
their attempts when made, rollout records for every explorer, and the cross-rank aggregation table."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from r3l_lightning.callbacks.exploration import AVERAGED_STATS, reduce_stats
from r3l_lightning.explore import (
    CritiqueGRPOExplorer,
    CritiqueGRPOReferenceExplorer,
    DAPOExplorer,
    GroupExplorer,
    R3LExplorer,
    RAFTExplorer,
    ReflectGRPOExplorer,
)
from r3l_lightning.explore.episodes import RolloutContext
from scripted import GuessEnv, GuessTasks, ScriptedEngine
from test_explorer import REFLECTION, script

GUIDED = "previous attempt at this task had issues"


class SeedRecordingEngine(ScriptedEngine):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.seeds: list[int] = []

    def generate(self, prompts, params, constraints=None):
        self.seeds.append(params.seed)
        return super().generate(prompts, params, constraints)


def test_the_base_class_counts_calls_and_seeds_every_phase_from_them(tiny_chat):
    engine = SeedRecordingEngine(script(json.dumps(dict(REFLECTION, retry_from_step=0))), tiny_chat.tokenizer,
                                 tiny_chat.tokenizer.eos_token_id)
    explorer = R3LExplorer(group_size=2, seed=5)
    ctx = RolloutContext(GuessEnv(max_turns=1), engine, tiny_chat)
    explorer.explore([GuessTasks(1)[0]], ctx)
    explorer.explore([GuessTasks(1)[0]], ctx)
    # seed + 1000 · call + phase offset (base 0, reflection 1, retry 2): one base turn, a reflection, a retry
    assert engine.seeds == [1005, 1006, 1007, 2005, 2006, 2007]
    assert explorer.state_dict() == {"calls": 2}
    resumed = R3LExplorer(group_size=2, seed=5)
    resumed.load_state_dict(explorer.state_dict())
    assert resumed.calls == 2


def run(chat, explorer, responder, tasks=2, max_turns=3):
    engine = ScriptedEngine(responder, chat.tokenizer, chat.tokenizer.eos_token_id)
    source = GuessTasks(tasks, {"apple": 1.0})
    return explorer.explore([source[i] for i in range(tasks)], RolloutContext(GuessEnv(max_turns), engine, chat))


def reflect_grpo_script(prompt: str) -> str:
    if "Write the JSON diagnosis" in prompt:
        return json.dumps(dict(REFLECTION, retry_from_step=0))
    return "apple" if GUIDED in prompt else "pear"


EXPLORERS = [
    (lambda: GroupExplorer(group_size=3), lambda p: "pear"),
    (lambda: DAPOExplorer(group_size=3, overlong_penalty=0.0, drop_uniform_groups=False), lambda p: "pear"),
    (lambda: RAFTExplorer(group_size=3), lambda p: "apple"),
    (lambda: R3LExplorer(group_size=4), script(json.dumps(REFLECTION))),
    (lambda: R3LExplorer(group_size=4, advantage="r3l_reference", correction_loss="reinforce"),
     script(json.dumps(REFLECTION))),
    (lambda: ReflectGRPOExplorer(group_size=4), reflect_grpo_script),
    (lambda: CritiqueGRPOExplorer(group_size=3), script(json.dumps(dict(REFLECTION, retry_from_step=0)))),
    (lambda: CritiqueGRPOReferenceExplorer(group_size=3),
     lambda p: "apple" if "Critique of your previous attempt" in p else "Wrong." if "Critique it" in p else "pear"),
]


@pytest.mark.parametrize("make, responder", EXPLORERS, ids=["group", "dapo", "raft", "r3l", "r3l_reinforce", "reflect_grpo",
                                                            "critique_grpo", "critique_grpo_reference"])
def test_every_sample_is_in_the_record_of_the_attempt_it_was_made_from(tiny_chat, make, responder):
    explorer = make()
    result = run(tiny_chat, explorer, responder)
    trained = [s for g in result.groups for s in g] + result.sft
    assert trained, "the scripted run trains something"
    # every sample handed out is recorded once, under one attempt of its own task's record
    recorded = [(r["task_id"], s) for r in result.records for a in r["attempts"] for s in a["samples"]]
    assert len(recorded) == len(trained)
    assert sorted((s.group_id, s.kind, s.advantage) for s in trained) == \
        sorted((task, s["kind"], s["advantage"]) for task, s in recorded)
    assert [r["task_id"] for r in result.records] == ["guess-0", "guess-1"]


def test_reflect_grpo_writes_records_with_its_plain_samples_and_reflected_attempts(tiny_chat):
    result = run(tiny_chat, ReflectGRPOExplorer(group_size=4), reflect_grpo_script, tasks=1, max_turns=1)
    (record,) = result.records
    attempts = record["attempts"]
    assert len(attempts) == 4  # N samples: 2 plain, 2 attempts
    assert [a["reflection"] is None for a in attempts] == [True, True, False, False]
    assert [a["pivot"] for a in attempts] == [None, None, 0, 0]
    assert [a["retry"]["reward"] if a["retry"] else None for a in attempts] == [None, None, 1.0, 1.0]
    assert [[s["kind"] for s in a["samples"]] for a in attempts] == [["base"], ["base"], ["base", "distill"],
                                                                      ["base", "distill"]]


def test_aggregation_table_averages_the_named_statistics_and_sums_the_rest(monkeypatch):
    # two ranks with equal statistics: an averaged one (named, or a time_*) stays, a max stays, a summed one doubles
    stats = {"base_success_rate": 0.25, "valid_reflection_rate": 0.5, "mean_pivot": 1.5, "time_explore_s": 10.0,
             "retries": 3.0, "tokens_base": 100.0, "samples_distill": 2.0, "time_generate_retry_s": 4.0,
             "completion_len_max_base": 7.0, "completions_base": 8.0}
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj] * 2))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op: tensor)  # equal ranks: the max is the value
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device="cpu", reduce=lambda t, reduce_op: 2 * t))
    reduced = reduce_stats(trainer, stats, R3LExplorer.averaged_stats | AVERAGED_STATS)
    assert reduced == {"base_success_rate": 0.25, "valid_reflection_rate": 0.5, "mean_pivot": 1.5,
                       "time_explore_s": 10.0, "retries": 6.0, "tokens_base": 200.0, "samples_distill": 4.0,
                       "time_generate_retry_s": 4.0, "completion_len_max_base": 7.0, "completions_base": 16.0}
    # a GRPO explorer's table does not name R³L's rates: they would be summed
    assert reduce_stats(trainer, {"mean_pivot": 1.5}, GroupExplorer.averaged_stats) == {"mean_pivot": 3.0}
