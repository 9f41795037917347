"""Retry tokens: R³L's retries from the pivot against retries from turn 0, on the same bases and reflections.

    python benchmarks/retry_tokens.py [--env alfworld|scienceworld] [--tasks 8] [--group_size 8] [--seed 0]
                                      [--model smollm2-135m-instruct] [--engine auto|hf|vllm] [--max_turns 25]
                                      [--keep_invalid_actions] [--pivot policy [middle last]]

Builds the environment, tasks and ``R3LExplorer`` from ``configs/<env>/r3l.yaml`` (ALFWorld: generated games,
not the official split) and runs the explorer's own steps: ``rollout`` of ``group_size // 2`` base trajectories
per task, ``reflect`` (once, schema decoding as configured), then ``retry`` on deep copies of the same
attempts ("pairs": a base and its reflection): from the pivot (R³L: the reflection's, or a forced one, see
``--pivot``) and from turn 0 (``retry_start`` 0, as Reflect-GRPO), with the same guidance text. Only pairs
whose reflection triggers a retry count, and the from-scratch variant retries exactly the pairs the pivot
variant retried (a pivot replay that fails is counted and dropped from both).

``--pivot`` chooses where the pivot variant restarts each retried pair (K: its base's turns):

- ``policy`` (default): the reflection's own ``retry_from_step``, as the explorer does;
- ``middle``: turn ⌊K/2⌋; ``last``: turn K−1 — a controlled pivot that shows what the retry mechanism saves
  when the pivot is late, independently of where the policy puts it.

A forced pivot is set on the benchmark's copies of the pairs only (``Reflection.retry_from_step``; the report,
so the guidance text, is the policy's), so ``restore``, the distill sample and its pivot mask all use it.
Several ``--pivot`` values run side by side on the same bases, reflections and retried pairs (a pair whose
replay fails under any of them is dropped from all), against one from-scratch run.

The engine (the config's default: vLLM when installed, else HF) is wrapped in :class:`CountingEngine`. Per variant:

- prefill tokens: Σ over the retries' generate calls of every prompt's length (a multi-turn retry re-sends its
  whole history each turn; what a prefix cache saves is not subtracted);
- decode tokens: Σ of the tokens generated;
- trained tokens: the trainable tokens (``TrainingSample.num_trainable_tokens``) of the distill samples the
  variant yields, under the explorer's pivot mask (turns before the pivot are context only; from scratch: all).
  The paper's figure (R³L trained on 49–62 % fewer tokens than GRPO on ALFWorld, i.e. a fraction of 0.38–0.51)
  is printed next to ours.

Prints the pivot distribution of each pivot variant, a table per variant, the prefill, trained and decode
fractions (pivot ÷ scratch) of each next to its mean k/K, and last those of the first ``--pivot``:
``pivot_retry_token_fraction=<pivot decode tokens ÷ scratch decode tokens>``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from r3l_lightning.engines import default_engine
from r3l_lightning.engines.base import Completion, RolloutEngine, SamplingParams
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.base import is_success
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.attempt import Attempt, TaskGroup
from r3l_lightning.explore.r3l import R3LExplorer
from r3l_lightning.models import eos_token_ids, load_policy, load_tokenizer
from r3l_lightning.trajectory import ChatTokenizer, make_sample

ROOT = Path(__file__).resolve().parents[1]
PAPER_TRAINED_FRACTION = "0.38–0.51: R³L trained on 49–62 % fewer tokens than GRPO (ALFWorld, 1.5B)"
PIVOT_RULES = ("policy", "middle", "last")


@dataclass
class TokenCount:
    """Generate calls, prompt (prefill) tokens and generated (decode) tokens."""

    calls: int = 0
    prefill: int = 0
    decode: int = 0


class CountingEngine(RolloutEngine):
    """``inner`` with every generate call counted: prompt tokens (× ``n``) and generated tokens.

    :meth:`take` returns the counts since the last ``take`` (one phase of a run)."""

    def __init__(self, inner: RolloutEngine) -> None:
        self.inner = inner
        self.count = TokenCount()

    def bind(self, policy: torch.nn.Module, tokenizer, eos_token_ids: list[int]) -> None:
        super().bind(policy, tokenizer, eos_token_ids)
        self.inner.bind(policy, tokenizer, eos_token_ids)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 constraints: list[Constraint | None] | None = None) -> list[list[Completion]]:
        if constraints is None:  # engines written without constraints keep working
            outputs = self.inner.generate(prompts, params)
        else:
            outputs = self.inner.generate(prompts, params, constraints)
        self.count.calls += 1
        self.count.prefill += params.n * sum(len(p) for p in prompts)
        self.count.decode += sum(len(c.token_ids) for completions in outputs for c in completions)
        return outputs

    def sync_weights(self) -> None:
        self.inner.sync_weights()

    def max_context(self) -> int | None:
        return self.inner.max_context()

    def take(self) -> TokenCount:
        count, self.count = self.count, TokenCount()
        return count


@dataclass
class Variant:
    """One way of retrying the same pairs: its retries, their engine tokens and the distill samples' trained tokens.

    ``pivots`` holds, per pair handed to it, the turn its retries started from (None: not restored, no retry)."""

    name: str
    retries: int
    tokens: TokenCount
    trained: int
    seconds: float
    pivots: list[int | None]


@dataclass
class Measurement:
    """The shared bases and reflections, the base turns of the retried pairs, the pivot variants and scratch."""

    bases: int
    base_successes: int
    valid_reflections: int
    triggered: int
    dropped: int  # triggered, but some pivot variant could not restore the episode (replay mismatch, env error)
    base_turns: list[int]  # of the retried pairs
    base_tokens: TokenCount
    reflection_tokens: TokenCount
    variants: list[Variant]  # one per pivot rule, in the order asked; each pivots list matches base_turns
    scratch: Variant
    events: dict[str, int]  # the explorer's counted events (context overflows, invalid reflections, ...)


def forced_pivot(rule: str, num_turns: int) -> int:
    """The pivot ``middle`` (⌊K/2⌋) or ``last`` (K−1) gives a base of ``num_turns`` = K ≥ 1 turns."""
    if rule == "middle":
        return num_turns // 2
    if rule == "last":
        return num_turns - 1
    raise ValueError(f"no forced pivot for rule {rule!r}: use middle or last")


def with_pivot(pair: Attempt, rule: str) -> Attempt:
    """A deep copy of ``pair`` whose retries start at ``rule``'s pivot (``policy``: the reflection's own).

    Only ``retry_from_step`` changes: the report, hence the guidance text, stays the policy's."""
    copied = copy.deepcopy(pair)
    if rule != "policy":
        step = forced_pivot(rule, pair.base.num_turns)
        copied.report = dataclasses.replace(copied.report, retry_from_step=step)
    return copied


def _retry_variant(name: str, explorer: R3LExplorer, pairs: list[Attempt], ctx: RolloutContext,
                   engine: CountingEngine, counters: RolloutCounters) -> Variant:
    """``explorer.retry`` on ``pairs``; the engine's tokens and the trained tokens of the distill samples."""
    engine.take()
    start = time.perf_counter()
    explorer.retry(pairs, ctx, counters)
    seconds = time.perf_counter() - start
    tokens = engine.take()
    trained = 0
    for pair in pairs:
        for retry in pair.retries:
            distill = explorer.distill(pair, retry)
            sample = make_sample(ctx.chat.tokenize(distill.messages), 0.0, "distill", explorer.credit_pivot(pair))
            trained += sample.num_trainable_tokens
    pivots = [p.pivot if p.retries else None for p in pairs]
    return Variant(name, sum(len(p.retries) for p in pairs), tokens, trained, seconds, pivots)


def measure(explorer: R3LExplorer, tasks: list[Task], ctx: RolloutContext,
            pivot_rules: tuple[str, ...] = ("policy",)) -> Measurement:
    """Bases and reflections once; then retries from each rule's pivot and from scratch on copies of the same pairs."""
    if not pivot_rules or len(set(pivot_rules)) < len(pivot_rules) or not set(pivot_rules) <= set(PIVOT_RULES):
        raise ValueError(f"pivot_rules must be distinct values of {PIVOT_RULES}, got {pivot_rules}")
    engine = ctx.engine
    if not isinstance(engine, CountingEngine):
        raise TypeError(f"measure needs the context's engine wrapped in CountingEngine, got {type(engine).__name__}")
    counters = RolloutCounters()
    engine.take()
    groups = [TaskGroup(task) for task in tasks]
    explorer.rollout(groups, explorer.group_size // 2, ctx, counters)
    base_tokens = engine.take()
    pairs = [a for g in groups for a in g.attempts]
    explorer.reflect(pairs, ctx, counters)
    reflection_tokens = engine.take()
    triggered = [p for p in pairs if explorer.wants_retry(p)]

    kept = triggered
    while True:  # until every pivot variant restored every kept pair (deterministic replays: one pass)
        variants = [_retry_variant(rule, explorer, [with_pivot(p, rule) for p in kept], ctx, engine, counters)
                    for rule in pivot_rules]
        restored = [p for i, p in enumerate(kept) if all(v.pivots[i] is not None for v in variants)]
        if len(restored) == len(kept):
            break
        kept = restored  # a replay failed under some pivot: rerun all of them on the pairs every one restored
    scratch_explorer = copy.copy(explorer)
    scratch_explorer.retry_start = lambda attempt: 0  # retries from turn 0, as Reflect-GRPO
    scratch = _retry_variant("scratch", scratch_explorer, copy.deepcopy(kept), ctx, engine, counters)
    return Measurement(
        bases=len(pairs), base_successes=sum(is_success(p.base.reward) for p in pairs),
        valid_reflections=sum(p.report is not None for p in pairs), triggered=len(triggered),
        dropped=len(triggered) - len(kept), base_turns=[p.base.num_turns for p in kept], base_tokens=base_tokens,
        reflection_tokens=reflection_tokens, variants=variants, scratch=scratch,
        events={k: v for k, v in sorted(counters.counts.items()) if not k.startswith("tokens_")},
    )


def _fraction(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def _mean_k_over_turns(pivots: list[int], base_turns: list[int]) -> float:
    """Mean over the retried pairs of pivot ÷ base turns (nan when none was retried)."""
    return sum(k / t for k, t in zip(pivots, base_turns)) / len(pivots) if pivots else float("nan")


def report(m: Measurement) -> list[str]:
    """The lines the script prints; the last three are the first pivot variant's fractions, pivot ÷ scratch."""
    retried = len(m.base_turns)
    lines = [
        f"bases {m.bases} (successes {m.base_successes}): {m.base_tokens.calls} calls, prefill "
        f"{m.base_tokens.prefill}, decode {m.base_tokens.decode} tokens",
        f"reflections: {m.valid_reflections}/{m.bases} valid, {m.triggered} trigger a retry; prefill "
        f"{m.reflection_tokens.prefill}, decode {m.reflection_tokens.decode} tokens",
        f"retried pairs: {retried} ({m.dropped} dropped: a pivot variant could not restore their episode)",
        "counted (all variants): " + (", ".join(f"{k} {v}" for k, v in m.events.items()) or "nothing"),
    ]
    k_over_k = {v.name: _mean_k_over_turns(v.pivots, m.base_turns) for v in m.variants}
    if retried:
        lines.append(f"pivot k of the {retried} retried pairs (base turns K: mean {sum(m.base_turns) / retried:.2f})")
        for v in m.variants:
            histogram = ", ".join(f"{k}: {n}" for k, n in sorted(Counter(v.pivots).items()))
            lines.append(f"  {v.name:8s} mean k {sum(v.pivots) / retried:.2f}, mean k/K {k_over_k[v.name]:.2f}; "
                         f"pivots {{{histogram}}}")
            if not any(v.pivots):
                lines.append(f"  every {v.name} pivot is 0: it retries from turn 0 as scratch does and differs only "
                             f"by sampling (the reflections chose turn 0, or one-turn bases left no other; "
                             f"--keep_invalid_actions gives longer bases)")
    lines.append(f"{'variant':8s} {'retries':>7s} {'calls':>6s} {'prefill':>9s} {'decode':>8s} {'trained':>8s} "
                 f"{'prefill/r':>10s} {'decode/r':>9s} {'trained/r':>10s} {'seconds':>8s}")
    for v in (*m.variants, m.scratch):
        n = max(v.retries, 1)
        lines.append(f"{v.name:8s} {v.retries:7d} {v.tokens.calls:6d} {v.tokens.prefill:9d} {v.tokens.decode:8d} "
                     f"{v.trained:8d} {v.tokens.prefill / n:10.1f} {v.tokens.decode / n:9.1f} {v.trained / n:10.1f} "
                     f"{v.seconds:8.1f}")
    s = m.scratch
    lines.append(f"fractions of scratch: {'pivot':8s} {'k/K':>5s} {'prefill':>8s} {'trained':>8s} {'decode':>7s}")
    for v in m.variants:
        lines.append(f"{'':21s} {v.name:8s} {k_over_k[v.name]:5.2f} "
                     f"{_fraction(v.tokens.prefill, s.tokens.prefill):8.3f} {_fraction(v.trained, s.trained):8.3f} "
                     f"{_fraction(v.tokens.decode, s.tokens.decode):7.3f}")
    p = m.variants[0]
    lines += [
        f"pivot_retry_prefill_fraction={_fraction(p.tokens.prefill, s.tokens.prefill):.3f}",
        f"pivot_retry_trained_fraction={_fraction(p.trained, s.trained):.3f} (paper: {PAPER_TRAINED_FRACTION})",
        f"pivot_retry_token_fraction={_fraction(p.tokens.decode, s.tokens.decode):.3f}",
    ]
    return lines


def instantiate(spec: dict, **overrides):
    """``class_path(**init_args, **overrides)`` of a config entry."""
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**{**spec.get("init_args", {}), **overrides})


def make_engine(choice: str) -> RolloutEngine:
    if choice == "hf":
        from r3l_lightning.engines.hf import HFEngine

        return HFEngine()
    if choice == "vllm":
        from r3l_lightning.engines.vllm import VLLMEngine

        return VLLMEngine()
    return default_engine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="alfworld", choices=["alfworld", "scienceworld"],
                        help="configs/<env>/r3l.yaml gives the environment, tasks and explorer")
    parser.add_argument("--tasks", type=int, default=8, help="tasks, drawn with --seed from the config's train tasks")
    parser.add_argument("--group_size", "--group-size", type=int, default=None,
                        help="N (N/2 bases per task); default: the config's")
    parser.add_argument("--max_turns", "--max-turns", type=int, default=None, help="default: the config's")
    parser.add_argument("--keep_invalid_actions", "--keep-invalid-actions", action="store_true",
                        help="an inadmissible action no longer ends the episode (end_on_invalid_action: false), so a "
                             "model that rarely writes one still gets bases of --max_turns turns to pick a pivot in "
                             "(not the paper's rule)")
    parser.add_argument("--pivot", nargs="+", default=["policy"], choices=PIVOT_RULES,
                        help="where the pivot variant restarts a retried pair: the reflection's pivot (policy), "
                             "turn ⌊K/2⌋ (middle) or K−1 (last); several run side by side on the same pairs, the "
                             "last lines giving the first's fractions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="default: the config's (the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm"],
                        help="auto: the main job's default (vLLM when installed, else HF)")
    args = parser.parse_args()
    if len(set(args.pivot)) < len(args.pivot):
        parser.error(f"--pivot values must be distinct, got {args.pivot}")
    for name in ("tasks", "group_size", "max_turns"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "group_size" else 1):
            parser.error(f"--{name} must be >= {2 if name == 'group_size' else 1}, got {value}")
    print(f"load average: {os.getloadavg()}; cpus: {os.cpu_count()}; torch threads: {torch.get_num_threads()}")

    config = yaml.safe_load((ROOT / "configs" / args.env / "r3l.yaml").read_text())
    data = config["data"]
    env_overrides = {} if args.max_turns is None else {"max_turns": args.max_turns}
    if args.keep_invalid_actions:
        env_overrides["end_on_invalid_action"] = False
    env = instantiate(data["environment"], **env_overrides)
    source = instantiate(data["train_tasks"])
    explorer = instantiate(data["explorer"], seed=args.seed,
                           **({} if args.group_size is None else {"group_size": args.group_size}))
    if args.tasks > len(source):
        parser.error(f"--tasks {args.tasks} exceeds the config's {len(source)} train tasks")
    tasks = [source[i] for i in sorted(random.Random(args.seed).sample(range(len(source)), args.tasks))]
    if getattr(source, "disclaimer", None):
        print(source.disclaimer)

    model = args.model or config["model"]["model_name_or_path"]
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(model)
    policy = load_policy(model, getattr(torch, config["model"].get("model_dtype", "float32"))).eval()
    chat = ChatTokenizer(tokenizer, eos_token_ids(policy, tokenizer))
    engine = CountingEngine(make_engine(args.engine))
    engine.bind(policy, tokenizer, chat.eos_token_ids)
    print(f"{args.env}: {len(tasks)} tasks × {explorer.group_size // 2} bases, max {env.max_turns} turns, invalid actions "
          f"{'end' if env.end_on_invalid_action else 'do not end'} the episode; {model}, "
          f"{type(engine.inner).__name__}, reflection decoding {explorer.reflection_decoding}, seed {args.seed}, "
          f"pivots {', '.join(args.pivot)}")

    start = time.perf_counter()
    try:
        result = measure(explorer, tasks, RolloutContext(env, engine, chat), tuple(args.pivot))
    finally:
        if hasattr(engine.inner, "close"):
            engine.inner.close()
        if hasattr(env, "close"):
            env.close()
    print(f"wall time {time.perf_counter() - start:.0f} s; load average after: {os.getloadavg()}")
    lines = report(result)
    if not result.base_turns:
        print("\n".join(lines[:-3]))
        raise SystemExit("no reflection triggered a retry, so there is nothing to compare: raise --tasks")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
