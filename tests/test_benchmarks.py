"""One fast run per speed benchmark on the tiny model, so the scripts do not rot: each prints its table and
its last line (the figures themselves come from the full runs, see benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest

from r3l_lightning.explore import R3LExplorer
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.explore.reflection import guidance_text, parse_reflection
from r3l_lightning.trajectory import Message
from scripted import GuessEnv, GuessTasks, ScriptedEngine
from test_cli import ROOT

TINY = ["--model", "tiny-random-smollm2", "--steps", "1"]


def run(script: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_train_step_prints_rows_profile_and_mfu():
    lines = run("train_step.py", *TINY, "--sequences", "4", "--min-len", "16", "--max-len", "64",
                "--micro-batch-tokens", "128", "--rows", "fp32,fp32-full-logits", "--profile")
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in ("fp32", "fp32-full-logits")}
    assert set(rows) == {"fp32", "fp32-full-logits"}
    for row in rows.values():
        micro_batches, forwards = int(row[5]), int(row[6])
        # lengths 16, 32, 48, 64 shortest first within 128 padded tokens: [16, 32] (2 × 32) and [48, 64] (2 × 64)
        assert micro_batches == 2
        assert forwards == micro_batches  # R³L: one policy forward per micro-batch, no reference, no old logprobs
    # the profile: per row, the step's seconds by operator category (GEMMs first), then the GEMMs' FLOP rate
    for row in ("fp32", "fp32-full-logits"):
        start = lines.index(next(line for line in lines if line.startswith(f"{row}: ")))
        categories = [line.split("  ")[1].strip() for line in lines[start + 1:start + 8]]
        assert categories == ["gemm", "attention", "optimizer", "copies and allocation",
                              "elementwise, norms, log-softmax", "other", "outside operators (Python, dispatch)"]
        assert float(lines[start + 1].split()[1]) > 0
        assert "TFLOP per step" in lines[start + 8]
    assert re.fullmatch(r"train_mfu=\d+\.\d{3}", lines[-1])


def test_packing_checks_logprobs_and_prints_variants():
    lines = run("packing.py", *TINY, "--sequences", "4", "--min-len", "16", "--max-len", "64",
                "--micro-batch-tokens", "128")
    for variant in ("packed-128", "packed-64"):
        (check,) = [line for line in lines if line.startswith(f"{variant}: max |logprob - bucketed|")]
        assert float(check.split("= ")[1].split()[0]) < 1e-4
    variants = ("bucketed", "packed-128", "packed-64")
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in variants}
    # lengths 16, 32, 48, 64 (160 tokens). bucketed: [16, 32] (2 × 32) and [48, 64] (2 × 64), 1 - 160/192 padded.
    # packed-128: one row per micro-batch, [64, 48, 16] and [32]. packed-64: rows [64], [48, 16], [32], two per
    # micro-batch: 2 × 64 and 1 × 32. Neither pads.
    assert [rows["bucketed"][i] for i in (3, 4, 5, 6)] == ["16.7%", "2", "4", "64"]
    assert [rows["packed-128"][i] for i in (3, 4, 5, 6)] == ["0.0%", "2", "2", "128"]
    assert [rows["packed-64"][i] for i in (3, 4, 5, 6)] == ["0.0%", "2", "3", "64"]
    assert re.fullmatch(r"packed_over_bucketed_step_speed=\d+\.\d\d \(packed-(128|64) vs bucketed\)", lines[-1])


def _rollout_throughput():
    spec = importlib.util.spec_from_file_location("rollout_throughput", ROOT / "benchmarks" / "rollout_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its `from machine import ...`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def _event(name: str, start_s: float, end_s: float, shapes=None, flops=None, children=()):
    from torch.autograd.profiler_util import FunctionEvent

    event = FunctionEvent(0, name, 1, start_s * 1e6, end_s * 1e6, input_shapes=shapes or [], flops=flops)
    for child in children:
        event.append_cpu_child(child)
        child.set_cpu_parent(event)
    return event


def test_rollout_profile_breakdown_by_hand():
    module = _rollout_throughput()
    mul = _event("aten::mul", 6.6, 7.6, [[64, 576], [64, 576]])
    events = [
        _event("_C::onednn_mm", 0.0, 4.0, [[64, 100_000], [64, 5_000], [], []]),  # 2·64·1e5·5e3 = 64 GFLOP
        _event("aten::linear", 4.0, 5.0, children=[_event("aten::addmm", 4.1, 4.9, flops=36_000_000_000)]),
        _event("vllm::unified_attention_with_output", 5.0, 6.0),
        _event("aten::log_softmax", 6.0, 6.5, [[64, 49152], [], []]),
        _event("Torch-Compiled Region: 0/0", 6.5, 8.0, children=[mul]),  # a range: its mul counts, not its 0.5 s
        _event("aten::mean", 8.0, 8.5, [[64, 576], [], [], []]),
    ]
    events.insert(5, mul)  # the profiler lists children too
    ops = module.top_level_ops(events)
    assert sorted(e.name for e in ops) == ["_C::onednn_mm", "aten::linear", "aten::log_softmax", "aten::mean",
                                           "aten::mul", "vllm::unified_attention_with_output"]
    lines = module.breakdown(10.0, ops, 49152, probe_flop_rate=40e9)
    rows = {line[:28].strip(): (float(line.split()[-2]), line.split()[-1]) for line in lines[1:6]}
    # 10 s wall: GEMMs 4 + 1 s, attention 1 s, log_softmax 0.5 s, mul 1 + mean 0.5 s; 2 s of no op
    assert rows == {"linear GEMMs": (5.0, "50.0%"), "attention": (1.0, "10.0%"), "sampling and logprobs": (0.5, "5.0%"),
                    "other tensor ops": (1.5, "15.0%"), "remainder (wall - op time)": (2.0, "20.0%")}
    # 64 + 36 GFLOP in 5 s: 20 GFLOP/s, half the probe's 40
    assert lines[6] == "linear GEMMs: 100.0 GFLOP at 20.0 GFLOP/s = 0.50 of the matmul probe (40.0 GFLOP/s)"
    assert lines[7] == "sampling and logprobs, largest: aten::log_softmax 0.50 s"
    assert lines[8] == "other tensor ops, largest: aten::mul 1.00 s, aten::mean 0.50 s"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_rollout_throughput_profiles_and_splits_threads():
    lines = run("rollout_throughput.py", "--model", "tiny-random-smollm2", "--prompts", "2", "--n", "2", "--tokens", "4",
                "--vllm-modes", "eager", "--bf16-tokens", "0", "--profile", "--threads", "1,2")
    text = "\n".join(lines)
    shares = re.findall(r"^(linear GEMMs|attention|sampling and logprobs|other tensor ops|remainder \(wall - op time\))"
                        r" +-?\d+\.\d\d +(-?\d+\.\d)%$", text, re.M)
    assert [name for name, _ in shares] == ["linear GEMMs", "attention", "sampling and logprobs", "other tensor ops",
                                            "remainder (wall - op time)"]
    assert sum(float(share) for _, share in shares) == pytest.approx(100.0, abs=0.3)  # the rows add up to the wall
    assert re.search(r"^linear GEMMs: \d+\.\d GFLOP at ", text, re.M)
    for count in (1, 2):
        assert f"vllm eager at {count} torch threads: " in text
        assert re.search(rf"^threads={count}: vllm eager \d+\.\d tokens/s, decode limit \d+\.\d tokens/s", text, re.M)
    assert re.fullmatch(r"rollout_fraction_of_limit=\d+\.\d{3}", lines[-1])


def test_vs_trl_prints_rows_and_speed_ratio():
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e '.[bench]' (scripts/install.sh does)")
    lines = run("vs_trl.py", *TINY, "--prompts", "1", "--group", "2", "--tokens", "8", "--rows", "trl-hf,ours-hf")
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in ("trl-hf", "ours-hf")}
    assert set(rows) == {"trl-hf", "ours-hf"}
    for row in rows.values():
        seconds, generate, rest = map(float, row[1:4])
        assert seconds > 0 and generate > 0 and abs(generate + rest - seconds) < 0.02
    # memory phases: one column per row; no vLLM in these rows; the peak row repeats the speed table's peak RSS
    table = lines[lines.index("process-tree RSS GB at each phase (peak since the previous phase):") + 1:]
    assert table[0].split() == ["phase", "trl-hf", "ours-hf"]
    cells = {line[:15].strip(): line[15:].split() for line in table[1:8]}
    assert list(cells) == ["imports", "models", "vllm import", "engine", "first generate", "first step", "peak"]
    assert cells["vllm import"] == cells["engine"] == ["-", "-"]
    for phase in ("imports", "models", "first generate", "first step"):
        assert len(cells[phase]) == 4, (phase, cells[phase])  # both rows marked it (ours: vs_trl's own callback)
        for rss, peak in zip(cells[phase][::2], cells[phase][1::2]):  # "4.12 (4.50)": RSS now, peak since before
            assert 0.1 < float(rss) <= float(peak.strip("()")) + 0.01
    assert cells["peak"] == [f"{float(rows[r][-1].rstrip('G')):.2f}" for r in ("trl-hf", "ours-hf")]
    for column, peak in enumerate(cells["peak"]):  # no phase's peak above the row's
        assert all(float(cells[p][2 * column + 1].strip("()")) <= float(peak) + 0.01
                   for p in ("imports", "models", "first generate", "first step"))
    assert re.fullmatch(r"ours_over_trl_step_speed=\d+\.\d\d \(ours-hf vs trl-hf\)", lines[-1])


def _retry_tokens_module():
    spec = importlib.util.spec_from_file_location("retry_tokens", ROOT / "benchmarks" / "retry_tokens.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


GUESS_REPORT = {"trajectory_summary": "guessed pear three times", "root_cause_analysis": "kept the same guess",
                "trajectory_outcome": "failure", "improvement_suggestion": "change the guess", "retry_from_step": 2}


def guess_script(prompt: str) -> str:
    """Bases guess pear and reflect with GUESS_REPORT; a guided retry guesses apple once two guesses failed."""
    if "Write the JSON diagnosis" in prompt:
        return json.dumps(GUESS_REPORT)
    if "previous attempt at this task had issues" in prompt:
        return "apple" if prompt.count("is wrong.") >= 2 else "plum"
    return "pear"


def test_retry_tokens_counts_pivot_and_scratch_retries_of_the_same_pairs(tiny_chat):
    retry_tokens = _retry_tokens_module()
    tokenizer, eos = tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id
    ids = {word: tokenizer(word, add_special_tokens=False)["input_ids"] + [eos] for word in ("pear", "plum", "apple")}
    assert {w: len(i) for w, i in ids.items()} == {"pear": 3, "plum": 3, "apple": 2}  # the arithmetic's premise
    engine = retry_tokens.CountingEngine(ScriptedEngine(guess_script, tokenizer, eos))
    env = GuessEnv(max_turns=3)
    m = retry_tokens.measure(R3LExplorer(group_size=4), [GuessTasks(1)[0]], RolloutContext(env, engine, tiny_chat),
                             ("policy", "middle", "last"))

    # 2 bases: pear × 3 turns (3 calls, decode 2 × 3 × 3 = 18), reward 0; both reflections ask for turn 2
    assert (m.bases, m.base_successes, m.triggered, m.dropped) == (2, 0, 2, 0)
    assert (m.base_tokens.calls, m.base_tokens.decode) == (3, 18)
    assert m.base_turns == [3, 3]
    policy, middle, last = m.variants
    # policy: the reflection's turn 2; middle: ⌊3/2⌋ = 1; last: 3 − 1 = 2
    assert (policy.pivots, middle.pivots, last.pivots) == ([2, 2], [1, 1], [2, 2])
    # from turn 2: one turn (apple), decode 2 × 2 = 4; from turn 1: plum, apple, decode 2 × (3 + 2) = 10;
    # from scratch: plum, plum, apple, decode 2 × (3 + 3 + 2) = 16
    for variant in (policy, last):
        assert (variant.retries, variant.tokens.calls, variant.tokens.decode) == (2, 1, 4)
    assert (middle.retries, middle.tokens.calls, middle.tokens.decode) == (2, 2, 10)
    assert (m.scratch.retries, m.scratch.tokens.calls, m.scratch.tokens.decode) == (2, 3, 16)
    # trained: the pivot mask leaves the turns from the pivot on: turn 2 (apple + eos: 2 × 2 = 4), turns 1–2
    # (2 × (3 + 2) = 10); from scratch every turn (2 × 8 = 16)
    assert (policy.trained, middle.trained, last.trained, m.scratch.trained) == (4, 10, 4, 16)

    # prefill: every prompt each retry sent, rebuilt by hand (guidance before the pivot turn's observation; from
    # scratch in the system prompt). The forced pivot keeps the policy's report, so the same guidance text.
    reflection, _ = parse_reflection(json.dumps(GUESS_REPORT), 3)
    guidance = guidance_text(reflection)
    system, first = env.system_prompt(), "Guess the secret word."

    def turn(word: str) -> list[Message]:
        return [Message("assistant", word, token_ids=ids[word]), Message("user", f"'{word}' is wrong.")]

    from_turn_1 = [Message("system", system), Message("user", first),
                   Message("assistant", "pear", token_ids=ids["pear"]), Message("system", guidance, guidance=True),
                   Message("user", "'pear' is wrong.")]
    from_turn_2 = from_turn_1[:2] + turn("pear") + from_turn_1[2:]
    scratch_start = [Message("system", f"{system}\n\n{guidance}", guidance=True), Message("user", first)]
    scratch_prompts = [scratch_start, scratch_start + turn("plum"), scratch_start + turn("plum") + turn("plum")]

    def prefill(prompts: list[list[Message]]) -> int:
        return 2 * sum(len(tiny_chat.prompt_ids(p)) for p in prompts)

    assert policy.tokens.prefill == last.tokens.prefill == prefill([from_turn_2])
    assert middle.tokens.prefill == prefill([from_turn_1, from_turn_1 + turn("plum")])
    assert m.scratch.tokens.prefill == prefill(scratch_prompts)

    lines = retry_tokens.report(m)
    assert "  middle   mean k 1.00, mean k/K 0.33; pivots {1: 2}" in lines
    fractions = lines[lines.index(next(line for line in lines if line.startswith("fractions of scratch"))) + 1 :][:3]
    for line, name, k_over_turns, variant in zip(fractions, ("policy", "middle", "last"), ("0.67", "0.33", "0.67"),
                                                 (policy, middle, last)):
        assert line.split() == [name, k_over_turns, f"{variant.tokens.prefill / m.scratch.tokens.prefill:.3f}",
                                f"{variant.trained / 16:.3f}", f"{variant.tokens.decode / 16:.3f}"]
    assert fractions[1].split()[-2:] == ["0.625", "0.625"]  # middle: trained and decode 10 / 16
    # the last three lines: the first variant's (policy)
    assert lines[-2].startswith("pivot_retry_trained_fraction=0.250 ")  # 4 / 16
    assert lines[-3] == f"pivot_retry_prefill_fraction={policy.tokens.prefill / m.scratch.tokens.prefill:.3f}"
    assert lines[-1] == "pivot_retry_token_fraction=0.250"  # decode 4 / 16


class FailsFirstReplayAtTurn2(R3LExplorer):
    """The first restore to turn 2 fails (as a replay mismatch); every other restore succeeds."""

    failed = False

    def restore(self, attempt, ctx, counters):
        if self.retry_start(attempt) == 2 and not self.failed:
            self.failed = True
            return None
        return super().restore(attempt, ctx, counters)


def test_retry_tokens_drops_a_pair_one_pivot_variant_could_not_restore_from_all(tiny_chat):
    retry_tokens = _retry_tokens_module()
    tokenizer, eos = tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id
    engine = retry_tokens.CountingEngine(ScriptedEngine(guess_script, tokenizer, eos))
    m = retry_tokens.measure(FailsFirstReplayAtTurn2(group_size=4), [GuessTasks(1)[0]],
                             RolloutContext(GuessEnv(max_turns=3), engine, tiny_chat), ("middle", "policy"))

    # first pass: middle restores both pairs, policy only the second; the rerun keeps the second pair alone
    assert (m.triggered, m.dropped, m.base_turns) == (2, 1, [3])
    middle, policy = m.variants
    assert (middle.pivots, policy.pivots) == ([1], [2])
    # the counts are the rerun's, one pair each: plum + apple (decode 5), apple (2); scratch plum, plum, apple (8)
    assert (middle.retries, middle.tokens.calls, middle.tokens.decode, middle.trained) == (1, 2, 5, 5)
    assert (policy.retries, policy.tokens.calls, policy.tokens.decode, policy.trained) == (1, 1, 2, 2)
    assert (m.scratch.retries, m.scratch.tokens.calls, m.scratch.tokens.decode, m.scratch.trained) == (1, 3, 8, 8)
    assert retry_tokens.report(m)[-1] == "pivot_retry_token_fraction=0.625"  # the first variant (middle): 5 / 8


@pytest.mark.skipif(shutil.which("java") is None or importlib.util.find_spec("scienceworld") is None,
                    reason="ScienceWorld needs Java and `pip install -e .[scienceworld]`")
def test_memory_prints_components_and_peak():
    # the ScienceWorld config (a JVM child process) with the tiny model and the HF engine, one small task
    lines = run("memory.py", "--configs", "configs/scienceworld/r3l.yaml",
                "--model.model_name_or_path", "tiny-random-smollm2", "--model.engine", "r3l_lightning.engines.hf.HFEngine",
                "--data.tasks_per_epoch", "1", "--data.groups_per_step", "1",
                "--data.explorer.init_args.group_size", "2", "--data.explorer.init_args.max_new_tokens", "8",
                "--data.explorer.init_args.reflection_max_new_tokens", "16")
    sampled = {m[0]: float(m[1]) for m in re.findall(r"^(trainer|environment) +(\d+\.\d\d) +\d+$", "\n".join(lines), re.M)}
    assert sampled["trainer"] > 0.1 and sampled["environment"] > 0.01  # python + torch alone is > 0.1 GB; one JVM
    phases = re.findall(r"^  (\w[\w ]*?) +trainer +\d+\.\d\d -> peak +\d+\.\d\d GB", "\n".join(lines), re.M)
    assert phases == ["loading", "fit start", "exploration", "training"]  # HFEngine: no engine creation phase
    libraries = re.search(r"^  libraries \(python, torch, transformers\) +\+(\d+\.\d\d) GB", "\n".join(lines), re.M)
    assert float(libraries.group(1)) > 0.1
    assert "environment: up to 2 JVMs, -Xmx384m" in "\n".join(lines)  # the config's max_jvms, the default options
    total = float(re.fullmatch(r"peak_rss_gb=(\d+\.\d\d)", lines[-1]).group(1))
    assert lines[-2] == f"scienceworld_peak_rss_gb={total:.2f}"
    assert total >= sampled["trainer"]  # the total is taken over the whole tree, at least at every sample
