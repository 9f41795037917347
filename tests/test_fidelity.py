"""The reference code's behaviour behind each switch of docs/fidelity_authors_code.md (issue 23), with expected values
worked out by hand from the reference code's formulas (GitHub shiweijiezero/R3L @ d503f6c, paths under
``trinity/common/workflows/envs/R3L/``): retries from scratch on Countdown, its correction rule, the guidance
placement, free reflection decoding for Reflect-GRPO and Critique-GRPO, RAFT's ScienceWorld threshold and the
authors' "w/o amplification". Scripted policies; the real Countdown environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from r3l_lightning.advantages import group_advantages
from r3l_lightning.cli import cli_main
from r3l_lightning.data import collate
from r3l_lightning.envs.base import Task
from r3l_lightning.envs.countdown import CountdownEnv
from r3l_lightning.envs.math import MathEnv
from r3l_lightning.explore import R3LExplorer
from r3l_lightning.explore.critique_grpo import CritiqueGRPOExplorer
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.explore.r3l import authors_workflow
from r3l_lightning.explore.raft import RAFTExplorer
from r3l_lightning.explore.reflect_grpo import ReflectGRPOExplorer
from r3l_lightning.losses import LossConfig
from r3l_lightning.models import TINY_RANDOM
from r3l_lightning.module import R3LModule
from r3l_lightning.prompts import REFLECTION_REQUEST
from r3l_lightning.trajectory import TrainingSample
from scripted import GuessEnv, GuessTasks, ScriptedEngine

ROOT = Path(__file__).resolve().parents[1]
TASK = Task("countdown-x-0", {"numbers": [6, 8], "target": 48, "operator": "*"})
GUIDED = "previous attempt at this task had issues"  # in the default guidance template
WRONG, RIGHT = "<answer>6 + 8</answer>", "<answer>6 * 8</answer>"
# the reference code's R³L settings (configs/methods/r3l_authors_code.yaml), less the decoding budget
AUTHORS = dict(advantage="r3l_reference", retry_from="authors", guidance_placement="authors", sft_rule="authors",
               correction_loss="reinforce", keep_success_reflections=True, reflection_decoding="free")


def report(outcome: str = "failure", pivot: int | None = 1) -> str:
    return json.dumps({
        "trajectory_summary": "added the numbers twice", "root_cause_analysis": "6 + 8 is 14, far below 48",
        "trajectory_outcome": outcome, "improvement_suggestion": None if outcome == "success" else "multiply",
        "retry_from_step": pivot})


def countdown_policy(reflection: str, base: list[str]):
    """Reflection prompts get ``reflection``; a guided prompt ``6 * 8`` (right); the base answers ``base`` in turn."""
    answers = iter(base)

    def respond(prompt: str) -> str:
        if REFLECTION_REQUEST in prompt:
            return reflection
        return RIGHT if GUIDED in prompt else next(answers)
    return respond


def countdown(chat, explorer, respond, max_attempts: int = 2):
    engine = ScriptedEngine(respond, chat.tokenizer, chat.tokenizer.eos_token_id)
    env = CountdownEnv(max_attempts=max_attempts, response_format="answer", end_on_invalid_format=False)
    return explorer.explore([TASK], RolloutContext(env, engine, chat)), engine


def trained(chat, sample) -> str:
    return chat.tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m])


# ----- finding 1: Countdown retries from scratch, k masks base and distill, the guided retry trains ------------


def test_countdown_under_the_authors_rule_retries_from_scratch_and_masks_k_on_base_and_distill(tiny_chat):
    # base: 6 + 8 twice (R = 0, 2 turns); report: failure, k = 1; retry from scratch (countdown/utils.py
    # second_rollout ignores retry_step) solves on attempt 1 (R' = 1, 1 turn).
    explorer = R3LExplorer(group_size=2, **AUTHORS)
    result, engine = countdown(tiny_chat, explorer, countdown_policy(report(pivot=1), [WRONG, WRONG]))
    assert engine.calls == [1, 1, 1, 1]  # two base turns, the reflection, ONE retry turn (nothing replayed)
    # the task's RL samples: the group [base, distill], then the corrections' one-sample groups
    base, distill, reflection, retry = result.groups[0]
    assert [s.kind for s in result.groups[0]] == ["base", "distill", "reflection", "retry"]
    # group [0, 1] under OPMDReweightAdvGroupAdvantage: R̄ = 0.5, s = [−0.5, 0.5]; R = 1 ≥ 1 → 1.0, s < 0 → s
    assert [base.advantage, distill.advantage] == pytest.approx([-0.5, 1.0])
    # R3L_workflow.py 283–290: the first k = 1 assistant turns of the base and of the distill are masked
    assert trained(tiny_chat, base) == WRONG + "<|im_end|>"  # turn 1 only
    assert sum(distill.loss_mask) == 0  # the distill's only turn is turn 0 < k
    assert GUIDED not in tiny_chat.tokenizer.decode(distill.input_ids)  # distilled: no guidance
    # R3L_workflow.py 329–345: R' > R and R' ≥ 1 → reflection and guided retry, each a group of one with
    # reward 1.0 → advantage 1.0 (baseline 0 for one sample); the guided retry is NOT masked
    assert reflection.advantage == pytest.approx(1.0) and retry.advantage == pytest.approx(1.0)
    assert trained(tiny_chat, retry) == RIGHT + "<|im_end|>"
    record = result.records[0]["attempts"][0]
    assert record["pivot"] == 0 and record["reflection"]["report"]["retry_from_step"] == 1
    # countdown/utils.py format_countdown_prompt_with_guidance: the guidance is in the first user message
    messages = record["retry"]["messages"]
    assert [(m["role"], m.get("guidance", False)) for m in messages] == [
        ("system", False), ("user", True), ("assistant", False)]
    assert messages[1]["content"].startswith("Using the numbers [6, 8]") and GUIDED in messages[1]["content"]


def test_the_paper_retries_the_same_pair_from_the_pivot(tiny_chat):
    # the same episode under retry_from: pivot (the paper): turn 0 is replayed, the retry answers at turn 1, and
    # every sample, the guided retry included, trains from turn 1
    explorer = R3LExplorer(group_size=2, **{**AUTHORS, "retry_from": "pivot", "guidance_placement": "paper"})
    result, engine = countdown(tiny_chat, explorer, countdown_policy(report(pivot=1), [WRONG, WRONG]))
    assert engine.calls == [1, 1, 1, 1]
    base, distill, _, retry = result.groups[0]
    assert [base.advantage, distill.advantage] == pytest.approx([-0.5, 1.0])
    assert [trained(tiny_chat, s) for s in (base, distill, retry)] == [
        WRONG + "<|im_end|>", RIGHT + "<|im_end|>", RIGHT + "<|im_end|>"]
    assert WRONG in tiny_chat.tokenizer.decode(retry.input_ids)  # turn 0, replayed, is context


def test_retry_from_authors_is_scratch_on_countdown_and_math_only():
    assert [authors_workflow(env) for env in (CountdownEnv(), MathEnv(), GuessEnv())] == ["countdown", "math", "agent"]
    with pytest.raises(ValueError, match="retry_from must be one of pivot, scratch, authors, got 'start'"):
        R3LExplorer(retry_from="start")


# ----- finding 3: the correction rule per task -------------------------------------------------------------


def test_the_authors_correction_rule_is_per_task(tiny_chat):
    # Countdown (countdown/R3L_workflow.py 329: R' > R and R' ≥ 1): base 6 + 8 then 6 * 8 (R = 1 in 2 turns),
    # report "success_but_inefficient", k = 0; the retry solves in 1 turn: R' = R → not a correction
    explorer = R3LExplorer(group_size=2, **AUTHORS)
    result, _ = countdown(tiny_chat, explorer, countdown_policy(report("success_but_inefficient", 0), [WRONG, RIGHT]))
    assert result.stats["retry_trigger_rate"] == 1.0
    assert [s.kind for s in result.groups[0]] == ["base", "distill"]
    # ALFWorld-like tasks (alfworld/R3L_workflow.py 319–321): also R' ≥ 1 in fewer turns → a correction
    def respond(prompt: str) -> str:
        if REFLECTION_REQUEST in prompt:
            return report("success_but_inefficient", 0)
        return "apple" if GUIDED in prompt or "'pear' is wrong" in prompt else "pear"
    engine = ScriptedEngine(respond, tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    result = R3LExplorer(group_size=2, **AUTHORS).explore([GuessTasks(1)[0]],
                                                          RolloutContext(GuessEnv(max_turns=3), engine, tiny_chat))
    assert [s.kind for s in result.groups[0]] == ["base", "distill", "reflection", "retry"]


# ----- finding 5: the authors' guidance placement on ALFWorld-like tasks -----------------------------------


def test_the_authors_placement_puts_the_guidance_after_x_k_and_repeats_x_k(tiny_chat):
    # alfworld/utils.py 161–213: for k > 0 the guided retry is ..., x_k, guidance, x_k and the distill ..., x_k, x_k.
    # Base: pear, kiwi (R = 0); report: failure, k = 1; the guided retry replays pear and answers apple (R' = 1)
    def respond(prompt: str) -> str:
        if REFLECTION_REQUEST in prompt:
            return report("failure", 1)
        if GUIDED in prompt:
            return "apple"
        return "kiwi" if "'pear' is wrong" in prompt else "pear"
    engine = ScriptedEngine(respond, tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    result = R3LExplorer(group_size=2, **AUTHORS).explore([GuessTasks(1)[0]],
                                                          RolloutContext(GuessEnv(max_turns=2), engine, tiny_chat))
    attempt = result.records[0]["attempts"][0]
    assert attempt["pivot"] == 1  # restored to turn 1: ALFWorld-like tasks retry from the pivot
    retry = [(m["role"], m["content"][:16], m.get("guidance", False)) for m in attempt["retry"]["messages"]]
    x1 = "'pear' is wrong."
    assert retry == [("system", retry[0][1], False), ("user", "Guess the secret", False), ("assistant", "pear", False),
                     ("user", x1, False), ("system", "Your previous at", True), ("user", x1, False),
                     ("assistant", "apple", False)]
    base, distill, _, guided = result.groups[0]
    text = tiny_chat.tokenizer.decode(distill.input_ids)
    assert text.count(x1) == 2 and GUIDED not in text
    # k = 1 masks turn 0 of the base, the distill and (replayed) the guided retry
    assert [trained(tiny_chat, s) for s in (base, distill, guided)] == [
        "kiwi<|im_end|>", "apple<|im_end|>", "apple<|im_end|>"]


# ----- finding 4: reflection decoding for Reflect-GRPO and Critique-GRPO ------------------------------------


@pytest.mark.parametrize("explorer_class", [ReflectGRPOExplorer, CritiqueGRPOExplorer])
@pytest.mark.parametrize("decoding", ["schema", "free"])
def test_reflect_and_critique_grpo_decode_reflections_as_told(tiny_chat, explorer_class, decoding):
    def respond(prompt: str) -> str:
        return report("failure", 0) if REFLECTION_REQUEST in prompt else "pear"
    engine = ScriptedEngine(respond, tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    explorer = explorer_class(group_size=2, reflection_decoding=decoding)
    explorer.explore([GuessTasks(1)[0]], RolloutContext(GuessEnv(max_turns=1), engine, tiny_chat))
    # calls: the samples, the reflection(s), the retries; GuessEnv constrains no response, so only a schema
    # reflection reaches the engine with a constraint
    constrained = [c is not None and any(x is not None for x in c) for c in engine.constraints]
    assert constrained == [False, decoding == "schema", False]


# ----- finding 6: RAFT on ScienceWorld, the authors' w/o amplification ----------------------------------------


def test_raft_keeps_partial_rewards_only_with_positive_reward(tiny_chat):
    # scienceworld/raft_workflow.py 121 keeps R > 0; the other tasks R ≥ 1. Rewards 0.5 (pear) and 0 (kiwi).
    for keep, kept in (("success", []), ("positive_reward", [0.5])):
        answers = iter(["pear", "kiwi"])
        engine = ScriptedEngine(lambda p: next(answers), tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
        result = RAFTExplorer(group_size=2, keep=keep).explore(
            [GuessTasks(1, {"pear": 0.5})[0]], RolloutContext(GuessEnv(max_turns=1), engine, tiny_chat))
        assert [s.reward for s in result.sft] == kept and result.groups == []
    with pytest.raises(ValueError, match="keep must be 'success' or 'positive_reward', got 'all'"):
        RAFTExplorer(keep="all")


def test_the_authors_no_amplification_needs_both_the_opmd_advantage_and_the_zero_baseline(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs/countdown/r3l.yaml"),
                  "--config", str(ROOT / "configs/methods/r3l_authors_code.yaml"),
                  "--config", str(ROOT / "configs/methods/r3l_authors_code_no_amplification.yaml"), "--print_config"])
    init_args = yaml.safe_load(capsys.readouterr().out)["data"]["explorer"]["init_args"]
    assert (init_args["advantage"], init_args["singleton"], init_args["correction_loss"]) == (
        "mean_baseline", "zero_baseline", "reinforce")
    R3LExplorer(advantage="mean_baseline", singleton="zero_baseline", correction_loss="reinforce")  # valid
    # opmd_advantage.py: A = R − R̄; a one-sample correction group: baseline 0, A = R = 1
    assert group_advantages([0.0, 1.0], "mean_baseline").tolist() == pytest.approx([-0.5, 0.5])
    assert group_advantages([1.0], "mean_baseline", singleton="zero_baseline").tolist() == pytest.approx([1.0])
    # without the zero baseline every correction would train nothing: refused
    with pytest.raises(ValueError, match="singleton zero_baseline"):
        R3LExplorer(advantage="mean_baseline", correction_loss="reinforce")


# ----- finding 6: the reference code's per-micro-batch token-mean, logits at the rollout temperature ----------


@pytest.mark.parametrize("aggregation, expected", [("token-mean-per-micro-batch", 0.125), ("token-mean", 0.3125)])
def test_token_mean_per_micro_batch_by_hand(monkeypatch, aggregation, expected):
    # Two sequences in separate micro-batches of a step (mini-batch) of 2: 3 trained tokens with A = 1.0, 1 token
    # with A = −0.5; τ = 1, and log π = −1 at every token, so the loss is the weight on −Σ log π.
    # verl (dp_actor.py 176–187, dynamic batch size): ½·(3·1.0/3)/2 + ½·(1·(−0.5)/1)/2 = ½·(1.0/2) + ½·(−0.5/2)
    # = 0.125; one token-mean over the step: (3·1.0 − 0.5)/4/2 = 0.3125.
    module = R3LModule(TINY_RANDOM, loss=LossConfig(aggregation=aggregation, opmd_tau=1.0))
    monkeypatch.setattr(module, "_token_logprobs", lambda model, mb, with_entropy=False: (
        -torch.ones(mb["input_ids"].shape, requires_grad=True), torch.zeros(mb["input_ids"].shape)))
    long = TrainingSample([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], 1.0, "base")
    short = TrainingSample([11, 12, 13], [0, 0, 1], -0.5, "distill")
    batch = [collate([long]), collate([short])]
    rl_denom, sft_denom = module._global_denominators(batch)
    total = sum(module.micro_batch_loss(mb, rl_denom, sft_denom)[0] for mb in batch)
    assert total.item() == pytest.approx(expected)


def test_logits_at_the_rollout_temperature():
    # verl's actor computes log softmax(logits / T) with T the rollout temperature (dp_actor.py 69–71, 137)
    torch.manual_seed(0)
    module = R3LModule(TINY_RANDOM, loss=LossConfig(logit_temperature=0.7))
    ids = [5, 6, 7, 8, 9]
    mb = collate([TrainingSample(ids, [0, 1, 1, 1, 1], 1.0, "base")])
    logprobs, _ = module._token_logprobs(module.policy, mb)
    with torch.no_grad():
        logits = module.policy(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs[0, 1:].detach(), expected, rtol=1e-5, atol=1e-5)
    at_one = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert not torch.allclose(expected, at_one, atol=1e-3)  # T = 0.7 is not the model's own distribution
    with pytest.raises(ValueError, match="model.loss.logit_temperature must be > 0, got 0"):
        R3LModule(TINY_RANDOM, loss=LossConfig(logit_temperature=0))
