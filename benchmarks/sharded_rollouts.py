"""Rollouts from an FSDP2-sharded policy: lockstep generation vs an unsharded inference copy.

    python benchmarks/sharded_rollouts.py [--model smollm2-135m-instruct] [--prompts 4] [--tokens 32]

Two CPU processes (gloo), the policy sharded per decoder layer with ``fully_shard``, the same prompts
on both ranks. Measured side by side in one run:

- lockstep: ``HFEngine(synced_gpus=True)`` generates on the sharded model; every decode step of every
  rank all-gathers every layer's parameters.
- inference copy (the default): ``HFEngine.sync_weights()`` gathers the full weights once (one
  parameter at a time) into an unsharded copy, then generation runs locally with no collectives.

Prints the wall time of each (max over ranks) and their ratio.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.engines.hf import HFEngine
from r3l_lightning.models import decoder_layers, eos_token_ids, load_policy, load_tokenizer


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _worker(rank: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    tokenizer, policy = load_tokenizer(args.model), load_policy(args.model)
    eos = eos_token_ids(policy, tokenizer)
    mesh = init_device_mesh("cpu", (2,))
    for layer in decoder_layers(policy):
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Count from {i} to {i + 20}."}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(args.prompts)]
    params = SamplingParams(temperature=1.0, max_new_tokens=args.tokens, n=1, seed=rank)

    lockstep = HFEngine(synced_gpus=True)
    lockstep.bind(policy, tokenizer, [len(tokenizer) + 1])  # no stop id: every row runs all tokens
    lockstep_s = _timed(lambda: lockstep.generate(prompts, params))

    copy = HFEngine()
    copy.bind(policy, tokenizer, [len(tokenizer) + 1])
    gather_s = _timed(copy.sync_weights)
    local_s = _timed(lambda: copy.generate(prompts, params))
    if rank == 0:
        rows = args.prompts * args.tokens
        print(f"{args.model}, 2 ranks (gloo, 1 thread each), {args.prompts} prompts x {args.tokens} tokens per rank; "
              f"eos ids {eos} ignored")
        print(f"lockstep (synced_gpus on the sharded model): {lockstep_s:7.2f} s  ({rows / lockstep_s:6.1f} tokens/s per rank)")
        print(f"inference copy: gather {gather_s:5.2f} s + generate {local_s:6.2f} s = {gather_s + local_s:7.2f} s  "
              f"({rows / (gather_s + local_s):6.1f} tokens/s per rank)")
        print(f"lockstep / inference copy = {lockstep_s / (gather_s + local_s):.2f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=29533)
    mp.spawn(_worker, args=(parser.parse_args(),), nprocs=2)


if __name__ == "__main__":
    main()
