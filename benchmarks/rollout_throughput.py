"""Rollout throughput: the same Countdown prompts through HFEngine and VLLMEngine, side by side.

    python benchmarks/rollout_throughput.py [--model smollm2-135m-instruct] [--prompts 8] [--n 8] [--tokens 128]
    python benchmarks/rollout_throughput.py --device cuda --dtype bfloat16 [--skip-vllm]   # on a GPU

No end-of-turn id is passed to the engines: HF sequences run all ``--tokens`` tokens, vLLM's still
stop at the model's own EOS (rates are generated tokens per second either way). Prints generated
tokens/s of each engine and their ratio, vLLM's start-up and weight-sync time in eager and compiled
(torch.compile) mode, vLLM bf16 vs fp32 (``--bf16-tokens`` > 0, short eager runs: bf16 is native
only on CPUs with AVX512-BF16/AMX), and this machine's decode limit measured in the same run: the plain
``torch.matmul`` FLOP rate at the decode shapes (batch = prompts × n rows through every linear layer
of the model, lm_head included) divided by 2 × parameters per token. The last line is
``rollout_fraction_of_limit=<best engine tokens/s ÷ the limit in that engine's dtype>``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from machine import linear_shapes, matmul_rate

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


def timed_generate(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    engine.generate(prompts[:1], SamplingParams(params.temperature, params.top_p, 4, 1, 0))  # warm-up
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(c.token_ids) for o in out for c in o)
    return generated / elapsed, generated


def decode_limit(policy: torch.nn.Module, rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Tokens/s if every decode step ran all of the model's linear layers at the matmul rate measured
    in ``dtype`` on the policy's device."""
    device = next(policy.parameters()).device
    flop_rate = matmul_rate(linear_shapes(policy), rows, dtype, device, repeats)
    params_per_token = sum(p.numel() for p in policy.parameters())
    print(f"matmul rate at decode shapes ({rows} rows, {dtype}, {device}, {torch.get_num_threads()} threads): "
          f"{flop_rate / 1e9:.1f} GFLOP/s; 2 x {params_per_token / 1e6:.1f} M params per token")
    return flop_rate / (2 * params_per_token)


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
    limits = {dtype: decode_limit(policy, rows, getattr(torch, dtype)) for dtype in sorted(set(dtypes.values()))}
    for dtype, limit in limits.items():
        print(f"decode limit ({dtype}): {limit:.1f} tokens/s")
    fractions = {name: rate / limits[dtypes[name]] for name, rate in rates.items()}
    best = max(fractions, key=fractions.get)
    print(f"best engine: {best} ({dtypes[best]}); load average after: {os.getloadavg()}")
    print(f"rollout_fraction_of_limit={fractions[best]:.3f}")


if __name__ == "__main__":
    main()
