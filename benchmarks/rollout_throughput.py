"""Rollout throughput: the same Countdown prompts through HFEngine and VLLMEngine, side by side.

    python benchmarks/rollout_throughput.py [--model smollm2-135m-instruct] [--prompts 8] [--n 8] [--tokens 128]
    python benchmarks/rollout_throughput.py --device cuda --dtype bfloat16 [--skip-vllm]   # on a GPU
    python benchmarks/rollout_throughput.py --vllm-modes eager --bf16-tokens 0 --profile --threads 1,2

No end-of-turn id is passed to the engines: HF sequences run all ``--tokens`` tokens, vLLM's still
stop at the model's own EOS (rates are generated tokens per second either way). Prints generated
tokens/s of each engine and their ratio, vLLM's start-up and weight-sync time in eager and compiled
(torch.compile) mode, vLLM bf16 vs fp32 (``--bf16-tokens`` > 0, short eager runs: bf16 is native
only on CPUs with AVX512-BF16/AMX), and this machine's decode limit measured in the same run: the plain
``torch.matmul`` FLOP rate at the decode shapes (batch = prompts × n rows through every linear layer
of the model, lm_head included) divided by 2 × parameters per token. The last line is
``rollout_fraction_of_limit=<best engine tokens/s ÷ the limit in that engine's dtype>``.

``--profile``: the timed vLLM eager generate is repeated under ``torch.profiler`` (vLLM runs in this process, so
the profiler sees its ops) and its wall time is split into linear GEMMs (with their FLOPs and their rate against
the matmul probe), attention, sampling and logprobs over the vocabulary, other tensor ops, and the remainder
(wall − op time: Python, the scheduler, bookkeeping); see :func:`breakdown`. ``--threads 1,2``: vLLM eager's
tokens/s with torch at each intra-op thread count, next to the decode limit at that count.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
from machine import linear_shapes, matmul_rate
from torch.autograd.profiler_util import FunctionEvent

from r3l_lightning.engines.base import RolloutEngine, SamplingParams
from r3l_lightning.engines.hf import HFEngine
from r3l_lightning.envs.countdown import CountdownEnv, CountdownTasks
from r3l_lightning.models import eos_token_ids, load_policy, load_tokenizer
from r3l_lightning.trajectory import ChatTokenizer, Message

def countdown_prompts(tokenizer, eos: list[int], count: int) -> list[list[int]]:
    """The first ``count`` Countdown prompts (system + first observation) of a seeded task set."""
    env, tasks, chat = CountdownEnv(), CountdownTasks(size=count, seed=123), ChatTokenizer(tokenizer, eos)
    return [chat.prompt_ids([Message("system", env.system_prompt()),
                             Message("user", env.make_episode(tasks[i]).reset())]) for i in range(count)]


def timed_generate(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams,
                   around: contextlib.AbstractContextManager | None = None) -> tuple[float, int]:
    """(generated tokens/s, generated tokens) of one call after a short warm-up; ``around`` (a profiler)
    encloses the timed call."""
    engine.generate(prompts[:1], SamplingParams(params.temperature, params.top_p, 4, 1, 0))  # warm-up
    with around or contextlib.nullcontext():
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
    generated = sum(len(c.token_ids) for o in out for c in o)
    return generated / elapsed, generated


def decode_limit(policy: torch.nn.Module, rows: int, dtype: torch.dtype, repeats: int = 5) -> tuple[float, float]:
    """(tokens/s if every decode step ran all of the model's linear layers at the matmul rate measured in
    ``dtype`` on the policy's device, that matmul rate in FLOP/s)."""
    device = next(policy.parameters()).device
    flop_rate = matmul_rate(linear_shapes(policy), rows, dtype, device, repeats)
    params_per_token = sum(p.numel() for p in policy.parameters())
    print(f"matmul rate at decode shapes ({rows} rows, {dtype}, {device}, {torch.get_num_threads()} threads): "
          f"{flop_rate / 1e9:.1f} GFLOP/s; 2 x {params_per_token / 1e6:.1f} M params per token")
    return flop_rate / (2 * params_per_token), flop_rate


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "_C::onednn_mm"}
CATEGORIES = ("linear GEMMs", "attention", "sampling and logprobs", "other tensor ops")


def profiled_generate(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams
                      ) -> tuple[float, list[FunctionEvent]]:
    """(wall seconds, top-level op events) of :func:`timed_generate` under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True)
    rate, generated = timed_generate(engine, prompts, params, profiler)
    return generated / rate, top_level_ops(profiler.events())


def top_level_ops(events: list[FunctionEvent]) -> list[FunctionEvent]:
    """The ops (``namespace::name``) no other op encloses. Ranges that are not ops (``record_function``
    labels, compiled regions) are opened, so that their ops count and their own time stays in the remainder."""
    found, pending = [], [e for e in events if e.cpu_parent is None]
    while pending:
        event = pending.pop()
        if "::" in event.name:
            found.append(event)
        else:
            pending.extend(event.cpu_children)
    return found


def category(event: FunctionEvent, vocab_size: int) -> str:
    """The breakdown row of a top-level op: a GEMM (lm_head included), attention (rotary, KV-cache write,
    paged attention), an op on ``[rows, vocab]`` tensors (sampling and logprobs), or another tensor op."""
    if event.name in GEMM_OPS:
        return "linear GEMMs"
    if any(word in event.name for word in ("attention", "kv_cache", "rotary")):
        return "attention"
    if any(isinstance(shape, list) and shape and shape[-1] == vocab_size for shape in event.input_shapes):
        return "sampling and logprobs"
    return "other tensor ops"


def gemm_flops(event: FunctionEvent) -> int:
    """FLOPs of a GEMM op: 2·M·N·K from vLLM's ``onednn_mm(out [M, N], input [M, K], ...)`` shapes, else the
    profiler's count (``with_flops`` puts it on aten::mm/addmm/bmm, the children of aten::linear/matmul)."""
    if event.name == "_C::onednn_mm":
        (m, n), (_, k) = event.input_shapes[:2]
        return 2 * m * n * k
    return event.flops or sum(gemm_flops(child) for child in event.cpu_children)


def breakdown(wall: float, ops: list[FunctionEvent], vocab_size: int, probe_flop_rate: float) -> list[str]:
    """The profiled wall time by category (each top-level op's total CPU time, its children included, so no
    time counts twice), the GEMMs' achieved FLOP rate against the matmul probe, and the largest ops of the
    sampling and other rows."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    by_op: dict[str, dict[str, float]] = {c: {} for c in CATEGORIES}
    flops = 0
    for event in ops:
        row = category(event, vocab_size)
        seconds[row] += event.cpu_time_total / 1e6
        by_op[row][event.name] = by_op[row].get(event.name, 0.0) + event.cpu_time_total / 1e6
        if row == "linear GEMMs":
            flops += gemm_flops(event)
    seconds["remainder (wall - op time)"] = wall - sum(seconds.values())
    lines = [f"{'category':<28} {'s':>7} {'% of wall':>9}"]
    lines += [f"{name:<28} {s:7.2f} {100 * s / wall:8.1f}%" for name, s in seconds.items()]
    gemm_rate = flops / seconds["linear GEMMs"] if seconds["linear GEMMs"] else 0.0
    lines.append(f"linear GEMMs: {flops / 1e9:.1f} GFLOP at {gemm_rate / 1e9:.1f} GFLOP/s = "
                 f"{gemm_rate / probe_flop_rate:.2f} of the matmul probe ({probe_flop_rate / 1e9:.1f} GFLOP/s)")
    for row in ("sampling and logprobs", "other tensor ops"):
        largest = sorted(by_op[row].items(), key=lambda item: -item[1])[:6]
        lines.append(f"{row}, largest: " + ", ".join(f"{name} {s:.2f} s" for name, s in largest))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--bf16-tokens", type=int, default=8, help="vLLM bf16 run length (0: skip)")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-modes", default="eager,compiled", help="vLLM start modes to measure, in order")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (HF engine and the decode limit)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="HF policy dtype")
    parser.add_argument("--profile", action="store_true", help="profile vLLM eager's generate (see the docstring)")
    parser.add_argument("--threads", default="", help="vLLM eager tokens/s at these torch thread counts, e.g. 1,2")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}; cpus: {os.cpu_count()}; torch threads: {torch.get_num_threads()}")

    tokenizer, policy = load_tokenizer(args.model), load_policy(args.model, getattr(torch, args.dtype))
    policy.to(args.device).eval()
    prompts = countdown_prompts(tokenizer, eos_token_ids(policy, tokenizer), args.prompts)
    print(f"{len(prompts)} prompts, {sum(map(len, prompts)) / len(prompts):.0f} tokens on average, n={args.n}, "
          f"{args.tokens} new tokens each")
    params = SamplingParams(temperature=1.0, max_new_tokens=args.tokens, n=args.n, seed=0)
    # no end-of-turn id: every sequence runs to max_new_tokens (HF gets an id it cannot sample; vLLM
    # rejects out-of-vocabulary stop ids, so it gets none)
    never = [len(tokenizer) + 1]

    rates: dict[str, float] = {}
    threads = torch.get_num_threads()
    thread_counts = [int(t) for t in args.threads.split(",") if t]
    thread_rates: dict[int, float] = {}
    profile: tuple[float, list[FunctionEvent]] | None = None
    hf = HFEngine(max_batch_size=args.prompts * args.n)
    hf.bind(policy, tokenizer, never)
    dtypes: dict[str, str] = {"hf": args.dtype}  # the compute dtype of each measured engine
    rates["hf"], generated = timed_generate(hf, prompts, params)
    print(f"hf   {args.dtype} on {args.device}: {rates['hf']:.1f} tokens/s ({generated} tokens)")

    if not args.skip_vllm:
        try:
            from r3l_lightning.engines.vllm import VLLMEngine

            for mode in args.vllm_modes.split(","):
                engine = VLLMEngine(kv_cache_gib=2, max_model_len=2048, enforce_eager=mode == "eager")
                engine.bind(policy, tokenizer, [])
                start = time.perf_counter()
                engine.generate(prompts[:1], SamplingParams(1.0, 1.0, 1, 1, 0))  # creates the engine (+ first sync)
                print(f"vllm {mode}: start-up (incl. first sync) {time.perf_counter() - start:.1f} s")
                rates[f"vllm_{mode}"], generated = timed_generate(engine, prompts, params)
                dtypes[f"vllm_{mode}"] = engine._engine_dtype()
                print(f"vllm {mode} {engine._engine_dtype()}: {rates[f'vllm_{mode}']:.1f} tokens/s ({generated} tokens); "
                      f"vllm/hf ratio {rates[f'vllm_{mode}'] / rates['hf']:.2f}")
                if mode == "eager" and args.profile:
                    engine.llm.reset_prefix_cache()  # as before the timed call: only the warm-up prompt cached
                    profile = profiled_generate(engine, prompts, params)
                    print(f"vllm eager profiled: {profile[0]:.1f} s wall ({generated / rates['vllm_eager']:.1f} s "
                          f"unprofiled), {len(profile[1])} top-level ops")
                if mode == "eager":
                    for count in thread_counts:
                        torch.set_num_threads(count)
                        engine.llm.reset_prefix_cache()
                        thread_rates[count], _ = timed_generate(engine, prompts, params)
                        print(f"vllm eager at {torch.get_num_threads()} torch threads: "
                              f"{thread_rates[count]:.1f} tokens/s")
                    torch.set_num_threads(threads)
                syncs = []
                for _ in range(3):
                    start = time.perf_counter()
                    engine.sync_weights()
                    syncs.append(time.perf_counter() - start)
                print(f"vllm {mode} weight sync ({sum(p.numel() for p in policy.parameters()) / 1e6:.1f} M params, "
                      f"in-process stream): best {min(syncs):.2f} s of {len(syncs)}")
                engine.close()
            if args.bf16_tokens > 0:
                short = SamplingParams(1.0, 1.0, args.bf16_tokens, args.n, 0)
                shorts = {}
                for dtype in ("float32", "bfloat16"):
                    engine = VLLMEngine(kv_cache_gib=2, max_model_len=2048, dtype=dtype, enforce_eager=True)
                    engine.bind(policy, tokenizer, [])
                    shorts[dtype], _ = timed_generate(engine, prompts, short)
                    engine.close()
                print(f"vllm eager {args.bf16_tokens}-token runs: fp32 {shorts['float32']:.1f} tokens/s, bf16 "
                      f"{shorts['bfloat16']:.1f} tokens/s (bf16/fp32 {shorts['bfloat16'] / shorts['float32']:.2f})")
        except ImportError as err:
            print(f"vllm: skipped ({err})")

    rows = args.prompts * args.n
    probes = {dtype: decode_limit(policy, rows, getattr(torch, dtype)) for dtype in sorted(set(dtypes.values()))}
    limits = {dtype: limit for dtype, (limit, _) in probes.items()}
    for dtype, limit in limits.items():
        print(f"decode limit ({dtype}): {limit:.1f} tokens/s")
    if profile is not None:
        print(f"vllm eager generate, profiled ({args.prompts} prompts x n={args.n}, {args.tokens} new tokens):")
        print("\n".join(breakdown(*profile, policy.config.vocab_size, probes[dtypes["vllm_eager"]][1])))
    for count, rate in thread_rates.items():
        torch.set_num_threads(count)
        limit, _ = decode_limit(policy, rows, getattr(torch, dtypes["vllm_eager"]))
        print(f"threads={count}: vllm eager {rate:.1f} tokens/s, decode limit {limit:.1f} tokens/s, "
              f"fraction {rate / limit:.3f}")
    torch.set_num_threads(threads)
    fractions = {name: rate / limits[dtypes[name]] for name, rate in rates.items()}
    best = max(fractions, key=fractions.get)
    print(f"best engine: {best} ({dtypes[best]}); load average after: {os.getloadavg()}")
    print(f"rollout_fraction_of_limit={fractions[best]:.3f}")


if __name__ == "__main__":
    main()
