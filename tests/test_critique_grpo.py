"""Critique-GRPO, reference-code variant (``CritiqueGRPOReferenceExplorer``, alfworld/critique_grpo_workflow.py): free-text critiques of
failures only, a refinement kept only if it beats its sample, the best one REPLACES its sample in a group
of its own. (The paper variant is tested in test_explorer.py.)"""

from __future__ import annotations

import re

import pytest

from r3l_lightning.explore import CritiqueGRPOReferenceExplorer
from r3l_lightning.explore.episodes import RolloutContext
from scripted import GuessEnv, GuessTasks, ScriptedEngine

FRUIT = {"apple": 1.0, "fig": 1.0, "plum": 0.5}
CRITIQUE_ASKED = "Critique it so that the next attempt does better"  # in prompts.CRITIQUE_TEMPLATE
REFINING = "# Critique of your previous attempt"  # in prompts.REFINEMENT_TEMPLATE


def run(chat, base_answers, suggestions, group_size=4, seen=None):
    """One task. Base samples answer ``base_answers`` in turn; the critique of an attempt that answered w
    says "switch to {suggestions[w]}"; a refinement answers what its critique suggests."""
    answers = iter(base_answers)

    def respond(prompt: str) -> str:
        if seen is not None:
            seen.append(prompt)
        if CRITIQUE_ASKED in prompt:
            attempt = re.search(r"Response:\n(\w+)", prompt).group(1)
            return f"Wrong guess. Next time switch to {suggestions[attempt]}."
        if REFINING in prompt:
            return re.search(r"switch to (\w+)", prompt).group(1)
        return next(answers)

    engine = ScriptedEngine(respond, chat.tokenizer, chat.tokenizer.eos_token_id)
    explorer = CritiqueGRPOReferenceExplorer(group_size=group_size)
    result = explorer.explore([GuessTasks(1, FRUIT)[0]], RolloutContext(GuessEnv(max_turns=1), engine, chat))
    return result, engine


def text(chat, sample, trainable_only=False) -> str:
    return chat.tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m or not trainable_only])


def test_the_best_improving_refinement_replaces_its_sample_in_a_group_of_its_own(tiny_chat):
    # samples pear (0), plum (.5), apple (1), kiwi (0). Critiques for the 3 failures only. Refinements:
    # pear → plum (.5 > 0: kept), plum → plum (.5, not > .5: dropped), kiwi → fig (1 > 0: kept). Best: fig,
    # which replaces kiwi.
    seen = []
    result, engine = run(tiny_chat, ["pear", "plum", "apple", "kiwi"], {"pear": "plum", "plum": "plum", "kiwi": "fig"},
                         seen=seen)
    assert engine.calls == [4, 3, 3]
    critiques = [p for p in seen if CRITIQUE_ASKED in p]
    # one user message (the template may add its default system prompt), asking for free text
    assert all(p.count("<|im_start|>user") == 1 and "JSON" not in p for p in critiques)
    assert sorted(re.search(r"Final reward: (\S+) ", p).group(1) for p in critiques) == ["0", "0", "0.5"]
    (samples,) = result.groups
    assert [s.kind for s in samples] == ["base", "base", "base", "refinement"]
    assert [text(tiny_chat, s, trainable_only=True) for s in samples] == [
        "pear<|im_end|>", "plum<|im_end|>", "apple<|im_end|>", "fig<|im_end|>"]  # kiwi replaced
    refinement = samples[-1]
    assert REFINING not in text(tiny_chat, refinement) and "switch to" not in text(tiny_chat, refinement)
    # the N - 1 samples, GRPO over [0, .5, 1]: R̄ = .5, σ = sqrt((.25 + 0 + .25)/2) = .5 → [-1, 0, 1]/(.5 + 1e-6);
    # the refinement alone: the reference code's one-sample GRPO, baseline 0 and σ = 1 → 1/(1 + 1e-6)
    assert [s.advantage for s in samples] == pytest.approx([-0.999998, 0.0, 0.999998, 0.999999], abs=1e-6)
    assert (result.stats["critiques"], result.stats["refinements"], result.stats["samples_refinement"]) == (3, 3, 1)


def test_equally_good_refinements_keep_the_first(tiny_chat):
    # pear → apple, kiwi → fig, pear → apple, kiwi → fig: all four score 1 and beat their 0; the first wins
    result, _ = run(tiny_chat, ["pear", "kiwi", "pear", "kiwi"], {"pear": "apple", "kiwi": "fig"})
    (samples,) = result.groups
    assert [text(tiny_chat, s, trainable_only=True) for s in samples] == [
        "kiwi<|im_end|>", "pear<|im_end|>", "kiwi<|im_end|>", "apple<|im_end|>"]  # sample 0 replaced


def test_no_improving_refinement_leaves_the_n_samples(tiny_chat):
    # plum → plum ties its .5; pear → kiwi stays at 0: nothing is kept
    result, engine = run(tiny_chat, ["plum", "pear", "apple", "apple"], {"plum": "plum", "pear": "kiwi"})
    assert engine.calls == [4, 2, 2]
    (samples,) = result.groups
    assert [s.kind for s in samples] == ["base"] * 4
    # [.5, 0, 1, 1]: R̄ = .625; σ² = (.015625 + .390625 + 2·.140625)/3 = .22916667, σ = .47871355
    # → [-.125, -.625, .375, .375]/σ = [-.26111648, -1.30558242, .78334945, .78334945]
    assert [s.advantage for s in samples] == pytest.approx([-0.2611165, -1.3055824, 0.7833495, 0.7833495], abs=1e-5)


def test_successes_are_not_critiqued(tiny_chat):
    result, engine = run(tiny_chat, ["apple", "fig", "apple", "fig"], {})
    assert engine.calls == [4]
    assert result.stats["critiques"] == 0 and [s.advantage for s in result.groups[0]] == [0.0] * 4


def test_templates_must_name_their_fields():
    with pytest.raises(ValueError, match=r"reflection_prompt must contain \{reward\}"):
        CritiqueGRPOReferenceExplorer(reflection_prompt="Critique this: {trajectory}")
    with pytest.raises(ValueError, match=r"guidance_template must contain \{critique\}"):
        CritiqueGRPOReferenceExplorer(guidance_template="Try harder.")
