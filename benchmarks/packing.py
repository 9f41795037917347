"""Padding-free packing against length-bucketed padded micro-batches: forward + backward of the policy's per-token
logprobs (trained positions only, as the trainer computes them) on the sequences of ``train_step.py``.

    python benchmarks/packing.py [--model smollm2-135m-instruct] [--sequences 32] [--min-len 64] [--max-len 512]
                                 [--micro-batch-tokens 4096] [--variants bucketed,packed-4096,packed-512]

Variants:

- ``bucketed``: the DataModule's micro-batches (``plan_steps`` + ``collate``): shortest first, right-padded, a 2-D
  ``attention_mask``.
- ``packed-N``: sequences concatenated into rows of ≤ N tokens (first-fit decreasing), ``position_ids`` restarting
  at 0 for every sequence and no ``attention_mask``, ⌊micro-batch-tokens ÷ N⌋ rows per micro-batch (the rows of a
  micro-batch are right-padded to its longest; the padding is a segment of its own). transformers' sdpa path
  (``masking_utils.find_packed_sequence_indices``) turns the restarting ``position_ids`` into a 4-D block-causal
  boolean mask, so no token attends across sequences; on CPU no varlen kernel exists, so a row of T tokens costs
  attention over all T² (masked) pairs, not Σ s².

The per-token logprobs of every packed variant are first compared with the bucketed ones on the trained positions
(max |Δ|: must be fp32 noise, else the packing leaks or misplaces tokens). Each variant runs in a fresh process
(its peak RSS is its own) and prints the median seconds per step (forward + backward, no optimizer) after one
warm-up step, tokens/s (non-padding tokens), the padded fraction of its micro-batches and peak RSS.

Last line: ``packed_over_bucketed_step_speed=<bucketed s ÷ fastest packed s> (<that variant> vs bucketed)``.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import time

import torch
from rows import print_row, run_row as row_in_fresh_process
from train_step import add_sequence_arguments, sequence_arguments, sequences

from r3l_lightning.data import MicroBatch, collate, plan_steps
from r3l_lightning.losses import head_token_logprobs
from r3l_lightning.models import load_policy, output_projection
from r3l_lightning.trajectory import TrainingSample

LOGPROB_TOLERANCE = 1e-4  # fp32 noise of a 30-layer forward computed in differently shaped batches


def pack_rows(samples: list[TrainingSample], row_tokens: int) -> list[list[int]]:
    """Indices of the samples of each row, first-fit decreasing into rows of ≤ ``row_tokens`` tokens (a longer
    sample gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids)):
        length = len(samples[i].input_ids)
        slot = next((r for r, free in enumerate(room) if free >= length), None)
        if slot is None:
            rows.append([i])
            room.append(row_tokens - length)
        else:
            rows[slot].append(i)
            room[slot] -= length
    return rows


def collate_packed(samples: list[TrainingSample], rows: list[list[int]]) -> MicroBatch:
    """Rows of concatenated samples, right-padded to the longest row: input_ids, position_ids (restarting at 0 for
    every sample and for the padding tail), loss_mask (0 on each sample's first token, which has no prediction in
    its own sequence), token_advantages (advantage × loss_mask) and sample_index (index into ``samples``, -1 on
    padding). No attention_mask: the restarting position_ids are what keeps sequences apart."""
    width = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    shape = (len(rows), width)
    batch = {
        "input_ids": torch.zeros(shape, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "loss_mask": torch.zeros(shape, dtype=torch.float32),
        "token_advantages": torch.zeros(shape, dtype=torch.float32),
        "sample_index": torch.full(shape, -1, dtype=torch.long),
    }
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            s = samples[i]
            end = start + len(s.input_ids)
            loss_mask = torch.tensor(s.loss_mask, dtype=torch.float32)
            loss_mask[0] = 0.0
            batch["input_ids"][r, start:end] = torch.tensor(s.input_ids, dtype=torch.long)
            batch["position_ids"][r, start:end] = torch.arange(end - start)
            batch["loss_mask"][r, start:end] = loss_mask
            batch["token_advantages"][r, start:end] = s.advantage * loss_mask
            batch["sample_index"][r, start:end] = i
            start = end
        batch["position_ids"][r, start:] = torch.arange(width - start)
    return batch


def packed_micro_batches(samples: list[TrainingSample], row_tokens: int, micro_batch_tokens: int) -> list[MicroBatch]:
    """The samples packed into rows of ≤ ``row_tokens`` tokens, ⌊micro_batch_tokens ÷ row_tokens⌋ rows (at least
    one) per micro-batch, longest rows together."""
    rows = sorted(pack_rows(samples, row_tokens), key=lambda row: -sum(len(samples[i].input_ids) for i in row))
    per_micro = max(micro_batch_tokens // row_tokens, 1)
    return [collate_packed(samples, rows[i : i + per_micro]) for i in range(0, len(rows), per_micro)]


def bucketed_micro_batches(samples: list[TrainingSample], micro_batch_tokens: int) -> list[MicroBatch]:
    """The DataModule's micro-batches of one step holding all samples, with the same token_advantages and
    sample_index fields as :func:`collate_packed`."""
    (step,) = plan_steps([samples], [], 1, micro_batch_tokens, random.Random(0))
    index = {id(s): i for i, s in enumerate(samples)}
    micro = []
    for mb_samples in step:
        mb = collate(mb_samples)
        mb["token_advantages"] = mb["advantages"][:, None] * mb["loss_mask"]
        mb["sample_index"] = torch.tensor([index[id(s)] for s in mb_samples])[:, None].expand_as(mb["input_ids"])
        mb["sample_index"] = mb["sample_index"].masked_fill(mb["attention_mask"] == 0, -1)
        micro.append(mb)
    return micro


def token_logprobs(policy: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Per-token logprobs of ``mb`` on its trained positions (0 elsewhere), projecting only those onto the
    vocabulary as the trainer does; packed micro-batches (with ``position_ids``) run without an attention mask and
    without a KV cache (the model config's ``use_cache`` default would turn the packed-sequence detection off and
    let every token attend to the whole row)."""
    decoder, weight = output_projection(policy)
    if "position_ids" in mb:
        hidden = decoder(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False)
        hidden = hidden.last_hidden_state
    else:
        hidden = decoder(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).last_hidden_state
    logprobs, _ = head_token_logprobs(hidden, weight, mb["input_ids"], mb["loss_mask"] != 0)
    return logprobs


def per_sample_logprobs(micro: list[MicroBatch], logprobs: list[torch.Tensor], count: int) -> list[list[float]]:
    """The logprobs of each sample's trained positions (after its first token), in sample order."""
    out: list[list[float]] = [[] for _ in range(count)]
    for mb, values in zip(micro, logprobs):
        trained = (mb["loss_mask"] != 0) & (mb["sample_index"] >= 0)
        trained[:, 0] = False
        for i, value in zip(mb["sample_index"][trained].tolist(), values[trained].tolist()):
            out[i].append(value)
    return out


def run_variant(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    policy = load_policy(args.model)
    samples = sequences(args.sequences, args.min_len, args.max_len, policy.config.vocab_size)
    if args.variant == "bucketed":
        micro = bucketed_micro_batches(samples, args.micro_batch_tokens)
    else:
        micro = packed_micro_batches(samples, int(args.variant.removeprefix("packed-")), args.micro_batch_tokens)
    times, first_logprobs = [], None
    for _ in range(args.steps + 1):  # the first is the warm-up
        start = time.perf_counter()
        step_logprobs = []
        for mb in micro:
            logprobs = token_logprobs(policy, mb)
            (logprobs * mb["token_advantages"]).sum().backward()
            step_logprobs.append(logprobs.detach())
        policy.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if first_logprobs is None:
            first_logprobs = step_logprobs
    seconds = statistics.median(times[1:])
    tokens = sum(len(s.input_ids) for s in samples)
    return {
        "variant": args.variant, "s_per_step": seconds, "tokens_per_s": tokens / seconds,
        "padded_fraction": 1 - tokens / sum(mb["input_ids"].numel() for mb in micro), "micro_batches": len(micro),
        "rows": sum(mb["input_ids"].shape[0] for mb in micro), "widest": max(mb["input_ids"].shape[1] for mb in micro),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "attention": policy.config._attn_implementation,
        "logprobs": per_sample_logprobs(micro, first_logprobs, len(samples)),
    }


def max_abs_difference(a: list[list[float]], b: list[list[float]]) -> tuple[float, int]:
    """Largest |a − b| over all samples' trained positions, and the number of positions compared."""
    if [len(x) for x in a] != [len(x) for x in b]:
        raise ValueError("the variants trained different positions")
    diffs = [abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return max(diffs), len(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_sequence_arguments(parser, micro_batch_tokens=4096)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--variants", help="comma-separated: bucketed, packed-<row tokens> (default: bucketed, "
                                           "packed-<micro-batch-tokens>, packed-<max-len>)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.variant:
        print_row(run_variant(args))
        return
    variants = (args.variants or f"bucketed,packed-{args.micro_batch_tokens},packed-{args.max_len}").split(",")
    if variants[0] != "bucketed" or any(not v.removeprefix("packed-").isdigit() for v in variants[1:]):
        parser.error("--variants: bucketed first, then packed-<row tokens> variants")
    print(f"load average before: {os.getloadavg()}")
    results = []
    for variant in variants:
        cmd = ["--variant", variant, *sequence_arguments(args), "--steps", str(args.steps)]
        results.append(row_in_fresh_process(__file__, cmd))
    print(f"load average after: {os.getloadavg()}")
    print(f"{args.model}: {args.sequences} sequences of {args.min_len}-{args.max_len} tokens, "
          f"{args.micro_batch_tokens} tokens per micro-batch, {torch.get_num_threads()} threads, "
          f"attention {results[0]['attention']}")
    bucketed = results[0]
    for r in results[1:]:
        diff, positions = max_abs_difference(r["logprobs"], bucketed["logprobs"])
        print(f"{r['variant']}: max |logprob - bucketed| = {diff:.2e} over {positions} trained positions")
        if diff > LOGPROB_TOLERANCE:
            raise SystemExit(f"{r['variant']} does not reproduce the bucketed logprobs: the packing is wrong")
    print(f"{'variant':12s} {'s/step':>7s} {'tokens/s':>9s} {'padded':>7s} {'micro':>6s} {'rows':>5s} {'widest':>6s} "
          f"{'peak RSS':>9s}")
    for r in results:
        print(f"{r['variant']:12s} {r['s_per_step']:7.2f} {r['tokens_per_s']:9.0f} {r['padded_fraction']:7.1%} "
              f"{r['micro_batches']:6d} {r['rows']:5d} {r['widest']:6d} {r['peak_rss_gb']:8.2f}G")
    fastest = min(results[1:], key=lambda r: r["s_per_step"])
    print(f"packed_over_bucketed_step_speed={bucketed['s_per_step'] / fastest['s_per_step']:.2f} "
          f"({fastest['variant']} vs bucketed)")


if __name__ == "__main__":
    main()
