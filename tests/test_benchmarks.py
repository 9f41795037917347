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


def test_train_step_prints_rows_and_mfu():
    lines = run("train_step.py", *TINY, "--sequences", "4", "--min-len", "16", "--max-len", "64",
                "--micro-batch-tokens", "128", "--rows", "fp32,fp32-full-logits")
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in ("fp32", "fp32-full-logits")}
    assert set(rows) == {"fp32", "fp32-full-logits"}
    for row in rows.values():
        micro_batches, forwards = int(row[4]), int(row[5])
        # lengths 16, 32, 48, 64 shortest first within 128 padded tokens: [16, 32] (2 × 32) and [48, 64] (2 × 64)
        assert micro_batches == 2
        assert forwards == micro_batches  # R³L: one policy forward per micro-batch, no reference, no old logprobs
    assert re.fullmatch(r"train_mfu=\d+\.\d{3}", lines[-1])


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


def test_retry_tokens_counts_pivot_and_scratch_retries_of_the_same_pairs(tiny_chat):
    retry_tokens = _retry_tokens_module()
    report = {"trajectory_summary": "guessed pear three times", "root_cause_analysis": "kept the same guess",
              "trajectory_outcome": "failure", "improvement_suggestion": "change the guess", "retry_from_step": 2}

    def respond(prompt: str) -> str:  # bases guess pear; a guided retry guesses apple once two guesses failed
        if "Write the JSON diagnosis" in prompt:
            return json.dumps(report)
        if "previous attempt at this task had issues" in prompt:
            return "apple" if prompt.count("is wrong.") >= 2 else "plum"
        return "pear"

    tokenizer, eos = tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id
    ids = {word: tokenizer(word, add_special_tokens=False)["input_ids"] + [eos] for word in ("pear", "plum", "apple")}
    assert {w: len(i) for w, i in ids.items()} == {"pear": 3, "plum": 3, "apple": 2}  # the arithmetic's premise
    engine = retry_tokens.CountingEngine(ScriptedEngine(respond, tokenizer, eos))
    env = GuessEnv(max_turns=3)
    m = retry_tokens.measure(R3LExplorer(group_size=4), [GuessTasks(1)[0]], RolloutContext(env, engine, tiny_chat))

    # 2 bases: pear × 3 turns (3 calls, decode 2 × 3 × 3 = 18), reward 0; both reflections ask for turn 2
    assert (m.bases, m.base_successes, m.triggered, m.dropped) == (2, 0, 2, 0)
    assert (m.base_tokens.calls, m.base_tokens.decode) == (3, 18)
    assert m.pivots == [2, 2] and m.base_turns == [3, 3]
    # from the pivot: one turn (apple), decode 2 × 2 = 4; from scratch: plum, plum, apple, decode 2 × (3 + 3 + 2) = 16
    assert (m.pivot.retries, m.pivot.tokens.calls, m.pivot.tokens.decode) == (2, 1, 4)
    assert (m.scratch.retries, m.scratch.tokens.calls, m.scratch.tokens.decode) == (2, 3, 16)
    # trained: the pivot mask leaves turn 2 of the distill sample (apple + eos: 2 × 2 = 4); from scratch every
    # turn (2 × 8 = 16)
    assert (m.pivot.trained, m.scratch.trained) == (4, 16)

    # prefill: every prompt each retry sent, rebuilt by hand (guidance before the pivot turn's observation; from
    # scratch in the system prompt)
    reflection, _ = parse_reflection(json.dumps(report), 3)
    guidance = guidance_text(reflection)
    system, first = env.system_prompt(), "Guess the secret word."

    def turn(word: str) -> list[Message]:
        return [Message("assistant", word, token_ids=ids[word]), Message("user", f"'{word}' is wrong.")]

    pivot_prompt = ([Message("system", system), Message("user", first)] + turn("pear")
                    + [Message("assistant", "pear", token_ids=ids["pear"]), Message("system", guidance, guidance=True),
                       Message("user", "'pear' is wrong.")])
    scratch_start = [Message("system", f"{system}\n\n{guidance}", guidance=True), Message("user", first)]
    scratch_prompts = [scratch_start, scratch_start + turn("plum"), scratch_start + turn("plum") + turn("plum")]
    assert m.pivot.tokens.prefill == 2 * len(tiny_chat.prompt_ids(pivot_prompt))
    assert m.scratch.tokens.prefill == 2 * sum(len(tiny_chat.prompt_ids(p)) for p in scratch_prompts)

    lines = retry_tokens.report(m)
    assert lines[-2].startswith("pivot_retry_trained_fraction=0.250 ")  # 4 / 16
    assert lines[-3] == f"pivot_retry_prefill_fraction={m.pivot.tokens.prefill / m.scratch.tokens.prefill:.3f}"
    assert lines[-1] == "pivot_retry_token_fraction=0.250"  # decode 4 / 16


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
