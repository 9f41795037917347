"""LoRA policy → vLLM: merged-weight streaming against vLLM's own adapter loading, side by side.

    python benchmarks/lora_sync.py [--model smollm2-135m-instruct] [--rank 16] [--prompts 8] [--n 8] [--tokens 128]

For each ``VLLMEngine(lora_sync=...)`` (eager, the engine's default dtype) prints the start-up time (the
first sync included), decode tokens/s on Countdown prompts, the time of one weight sync (best of 3) and
how much of the greedy output of the two paths agrees. The adapter's B matrices are randomised
(std ``--b-std``) so that it changes the model, as a trained adapter would.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.engines.vllm import VLLMEngine
from r3l_lightning.lora import LoRAConfig, add_lora
from r3l_lightning.models import eos_token_ids, load_policy, load_tokenizer
from rollout_throughput import countdown_prompts, timed_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--b-std", type=float, default=0.02)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}; cpus: {os.cpu_count()}; torch threads: {torch.get_num_threads()}")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    policy = add_lora(load_policy(args.model), LoRAConfig(r=args.rank, alpha=2.0 * args.rank))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, args.b_std)
    adapter = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    print(f"LoRA r={args.rank} all-linear: {adapter / 1e6:.2f} M adapter params of {total / 1e6:.1f} M")
    prompts = countdown_prompts(tokenizer, eos_token_ids(policy, tokenizer), args.prompts)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.tokens, n=args.n, seed=0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.greedy_tokens)
    outputs = {}
    for mode in ("merged", "adapter"):
        engine = VLLMEngine(kv_cache_gib=2, max_model_len=2048, enforce_eager=True, lora_sync=mode)
        engine.bind(policy, tokenizer, [])
        start = time.perf_counter()
        engine.generate(prompts[:1], SamplingParams(1.0, 1.0, 1, 1, 0))  # creates the engine (+ first sync)
        startup = time.perf_counter() - start
        rate, generated = timed_generate(engine, prompts, params)
        syncs = []
        for _ in range(3):
            start = time.perf_counter()
            engine.sync_weights()
            syncs.append(time.perf_counter() - start)
        outputs[mode] = [c[0].token_ids for c in engine.generate(prompts, greedy)]
        print(f"lora_sync={mode} ({engine._engine_dtype()}): start-up (incl. first sync) {startup:.1f} s; "
              f"{rate:.1f} tokens/s ({generated} tokens); sync best {min(syncs):.3f} s of {len(syncs)}")
        engine.close()
    same = sum(a == b for x, y in zip(outputs["merged"], outputs["adapter"]) for a, b in zip(x, y))
    count = sum(min(len(x), len(y)) for x, y in zip(outputs["merged"], outputs["adapter"]))
    print(f"greedy tokens identical between the two paths: {same}/{count}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
