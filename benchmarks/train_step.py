"""Training-step speed: ``R3LModule.micro_batch_loss`` + backward + AdamW step, the trainer's own step, on a
fixed set of sequences with a realistic length spread, in fp32, bf16-mixed and bf16 weights; ``fp32-full-logits``
is the fp32 row with full ``[tokens, vocab]`` logits at every position (the path of sharded policies, and of every
policy before the trained-positions-only projection), for a side-by-side ratio.

    python benchmarks/train_step.py [--model smollm2-135m-instruct] [--sequences 32] [--min-len 64] [--max-len 512]
    python benchmarks/train_step.py --steps-file benchmarks/countdown_steps.json   # the main job's own steps

``--steps-file`` replays a run's recorded optimizer steps (``main_job_steps.py``; ``countdown_steps.json`` holds the
main job's 16) instead of the synthetic set: a "step" of the table is then one pass over all of them (the main
job's whole training), and its first pass is what a fresh run pays (compilation included).

The sequences (random token ids, lengths evenly spread over [min-len, max-len], the second half of each
trained with advantage ±1) are planned into micro-batches by the DataModule's own ``plan_steps``. Each row
runs in a fresh process (its peak RSS is its own) and prints: median seconds per optimizer step after one
warm-up step, trained tokens/s (non-padding tokens), the padded fraction of the micro-batches, policy forwards
per step, peak RSS, achieved TFLOP/s and model FLOPs utilisation, and the first (warm-up) step's seconds, which
include compilation in the ``fp32-compiled`` row (``torch.compile`` of every decoder layer, dynamic shapes).

- Model FLOPs per sequence of s tokens: 6·N·s + 6·L·d·s² (N: weights of the linear layers, lm_head included;
  attention scores and values, forward and backward, causal half of PaLM's 12·L·d·s²).
- MFU = achieved model FLOP/s ÷ this machine's fastest ``torch.matmul`` rate over fp32 and bf16, measured in the
  same run at the model's GEMM shapes: what the CPU can do, not what the row's dtype can.

``--profile`` runs ``torch.profiler`` over each row's timed steps and prints where the step's wall time goes: the
self time of every operator, grouped into GEMMs (with their achieved FLOP/s against the matmul probe and the
slowest GEMM shapes), attention, the loss's log-softmax, elementwise and normalisation ops, the optimizer, memory
copies and other ops; the remainder (wall − operator time) is Python and dispatch outside any operator.

Each row also prints the fraction of the weights the warm-up's AdamW steps moved (``--lr``, the Countdown config's
5e-5): bf16 weights drop an update smaller than half their rounding step.

Last line: ``train_mfu=<MFU of the configs' default path on this machine>``: the row ``precision: auto`` resolves
to here (``bf16-mixed`` with native bf16, else ``fp32``).
"""

from __future__ import annotations

import argparse
import random
import re
import resource
import statistics
import time
from contextlib import nullcontext

import torch
from machine import linear_shapes, matmul_rate
from rows import print_row, run_row as row_in_fresh_process

import r3l_lightning.module as module_lib
from r3l_lightning.data import collate, plan_steps
from r3l_lightning.engines.hf import HFEngine
from r3l_lightning.models import decoder_layers
from main_job_steps import load_steps
from r3l_lightning.module import R3LModule
from r3l_lightning.precision import auto_precision
from r3l_lightning.trajectory import TrainingSample

ROWS = {  # row -> (model_dtype, autocast dtype, full logits, torch.compile of the decoder layers)
    "fp32": ("float32", None, False, False),
    "fp32-full-logits": ("float32", None, True, False),
    "fp32-compiled": ("float32", None, False, True),
    "bf16-mixed": ("float32", torch.bfloat16, False, False),
    "bf16-mixed-compiled": ("float32", torch.bfloat16, False, True),
    "bf16": ("bfloat16", None, False, False),
}
DEFAULT_ROW = {"bf16-mixed": "bf16-mixed", "32-true": "fp32"}  # the configs' ``precision: auto`` -> its row


def sequences(count: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[TrainingSample]:
    """``count`` sequences with lengths evenly spread over [min_len, max_len], in a seeded shuffled order."""
    rng = random.Random(seed)
    lengths = [min_len + (max_len - min_len) * i // max(count - 1, 1) for i in range(count)]
    rng.shuffle(lengths)
    samples = []
    for i, length in enumerate(lengths):
        ids = [rng.randrange(vocab) for _ in range(length)]
        mask = [0.0] * (length // 2) + [1.0] * (length - length // 2)
        samples.append(TrainingSample(ids, mask, 1.0 if i % 2 == 0 else -1.0, "base", num_assistant_tokens=sum(mask)))
    return samples


GEMM = re.compile(r"^aten::(mm|addmm|bmm|baddbmm)$")
CATEGORIES = (  # (category, operator-name pattern): an operator's self time goes to the first that matches
    ("gemm", GEMM),
    ("attention", re.compile(r"attention")),
    ("optimizer", re.compile(r"^aten::_foreach_|adam", re.IGNORECASE)),
    ("copies and allocation", re.compile(r"^aten::(copy_|_to_copy|to|clone|contiguous|empty.*|zeros.*|zero_|fill_|"
                                         r"cat|index.*|slice.*|select.*|new_.*|resize_|as_strided.*|_unsafe_view)$")),
    ("elementwise, norms, log-softmax", re.compile(r"^aten::")),
)


def op_breakdown(prof: torch.profiler.profile, wall_s: float, steps: int) -> dict:
    """Per-step seconds by operator category (self CPU time, so nothing is counted twice), the remainder outside
    any operator, GEMM FLOPs, and the slowest GEMM shapes with their achieved FLOP/s."""
    seconds = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    top = []
    for event in prof.key_averages():
        self_s = event.self_cpu_time_total / 1e6 / steps
        category = next((name for name, pattern in CATEGORIES if pattern.search(event.key)), "other")
        seconds[category] += self_s
        top.append((self_s, event.key))
    gemms = [e for e in prof.key_averages(group_by_input_shape=True) if GEMM.search(e.key)]
    shapes = sorted(((e.self_cpu_time_total / 1e6 / steps, e.flops / steps, e.key, str(e.input_shapes))
                     for e in gemms), reverse=True)
    return {"wall_s": wall_s / steps, "seconds": seconds, "outside_ops_s": wall_s / steps - sum(seconds.values()),
            "gemm_flop": sum(e.flops for e in gemms) / steps, "top_ops": sorted(top, reverse=True)[:8],
            "gemm_shapes": shapes[:6]}


def print_breakdown(row: str, b: dict, peak: float) -> None:
    print(f"{row}: {b['wall_s']:.2f} s per step")
    for name, s in [*b["seconds"].items(), ("outside operators (Python, dispatch)", b["outside_ops_s"])]:
        print(f"  {name:38s} {s:7.2f} s {s / b['wall_s']:6.1%}")
    gemm_s = b["seconds"]["gemm"]
    print(f"  GEMMs: {b['gemm_flop'] / 1e12:.2f} TFLOP per step at {b['gemm_flop'] / gemm_s / 1e12:.3f} TFLOP/s "
          f"({b['gemm_flop'] / gemm_s / peak:.0%} of the probe)")
    for s, flop, name, shapes in b["gemm_shapes"]:
        print(f"    {name:12s} {shapes:48s} {s:6.2f} s {flop / max(s, 1e-9) / 1e12:6.3f} TFLOP/s")
    print("  top operators: " + ", ".join(f"{name} {s:.2f} s" for s, name in b["top_ops"]))


def add_sequence_arguments(parser: argparse.ArgumentParser, micro_batch_tokens: int) -> None:
    """The model and the sequence set of a step benchmark: ``--model``, ``--sequences``, ``--min-len``, ``--max-len``
    and ``--micro-batch-tokens`` (default ``micro_batch_tokens``)."""
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--micro-batch-tokens", type=int, default=micro_batch_tokens,
                        help="data.max_tokens_per_micro_batch")
    parser.add_argument("--steps-file", default=None,
                        help="replay a run's recorded optimizer steps (main_job_steps.py) instead of --sequences: "
                             "one timed pass over all of them after a warm-up pass")


def sequence_arguments(args: argparse.Namespace) -> list[str]:
    """:func:`add_sequence_arguments`' options as parsed, for a row's child process."""
    return ["--model", args.model, "--sequences", str(args.sequences), "--min-len", str(args.min_len),
            "--max-len", str(args.max_len), "--micro-batch-tokens", str(args.micro_batch_tokens),
            *(["--steps-file", args.steps_file] if args.steps_file else [])]


def model_flops(policy: torch.nn.Module, lengths: list[int]) -> float:
    config = policy.config
    weights = sum(i * o for i, o in linear_shapes(policy))
    return sum(6 * weights * s + 6 * config.num_hidden_layers * config.hidden_size * s * s for s in lengths)


def run_row(args: argparse.Namespace) -> dict:
    model_dtype, autocast, full_logits, compiled = ROWS[args.row]
    if full_logits:  # the path sharded (FSDP) policies take: [tokens, vocab] logits for every position
        module_lib.output_projection = lambda model: None
    torch.manual_seed(0)
    module = R3LModule(args.model, engine=HFEngine(), model_dtype=model_dtype, lr=1e-6)
    if compiled:  # one dynamic-shape graph per layer call site, shared by all layers (same code, weights as inputs)
        for layer in decoder_layers(module.policy):
            layer.compile(dynamic=True)
    vocab = module.policy.config.vocab_size
    recorded = (load_steps(args.steps_file, vocab) if args.steps_file
                else [sequences(args.sequences, args.min_len, args.max_len, vocab)])
    steps = [[collate(mb) for mb in step] for samples in recorded
             for step in plan_steps([samples], [], 1, args.micro_batch_tokens, random.Random(0))]
    samples = [s for step in recorded for s in step]
    micro = [mb for step in steps for mb in step]
    padded = sum(mb["input_ids"].numel() for mb in micro)
    tokens = sum(len(s.input_ids) for s in samples)
    params = [p for p in module.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    before = [p.detach().clone() for p in params]
    forwards = []
    decoder_layers(module.policy)[0].register_forward_pre_hook(lambda *_: forwards.append(1))
    context = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast is not None else nullcontext
    times = []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                      with_flops=True) if args.profile else None
    for i in range(args.steps + 1):  # the first is the warm-up; a step here is a pass over all the steps
        if profiler is not None and i == 1:
            profiler.start()
        forwards.clear()
        start = time.perf_counter()
        for step in steps:
            rl_denom, sft_denom = module._global_denominators(step)
            for mb in step:
                with context():
                    loss, _ = module.micro_batch_loss(mb, rl_denom, sft_denom)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if i == 0:  # weights the first AdamW steps moved: bf16 weights drop updates below half their rounding step
            changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before)) / sum(b.numel() for b in before)
            del before
    seconds = statistics.median(times[1:])
    first_step_s = times[0]  # the warm-up: includes compilation in the compiled row
    if profiler is not None:
        profiler.stop()
    breakdown = {"breakdown": op_breakdown(profiler, sum(times[1:]), args.steps)} if profiler is not None else {}
    return {**breakdown,
        "row": args.row, "s_per_step": seconds, "first_step_s": first_step_s, "tokens_per_s": tokens / seconds,
        "padded_fraction": 1 - tokens / padded, "micro_batches": len(micro), "forwards_per_step": len(forwards),
        "optimizer_steps": len(steps), "weights_changed": changed,
        "model_flop_per_s": model_flops(module.policy, [len(s.input_ids) for s in samples]) / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "linear_shapes": linear_shapes(module.policy),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_sequence_arguments(parser, micro_batch_tokens=1024)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (passes over --steps-file) after one warm-up")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW's lr (the Countdown config's)")
    parser.add_argument("--rows", default="fp32,fp32-full-logits,bf16-mixed,bf16")
    parser.add_argument("--peak-dtypes", default="float32,bfloat16",
                        help="dtypes of the matmul-rate probe (float32 alone on CPUs without native bf16: their "
                             "bf16 matmuls are emulated and take minutes)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown of each row's timed steps")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    if args.row:
        print_row(run_row(args))
        return
    results = []
    for row in args.rows.split(","):
        if row not in ROWS:
            parser.error(f"--rows: unknown row {row!r}; options: {', '.join(ROWS)}")
        cmd = ["--row", row, *sequence_arguments(args), "--steps", str(args.steps), "--lr", str(args.lr)]
        cmd += ["--profile"] if args.profile else []
        results.append(row_in_fresh_process(__file__, cmd))
    shapes = [tuple(s) for s in results[0]["linear_shapes"]]
    rows = min(args.micro_batch_tokens, args.sequences * args.max_len)
    peaks = {d: matmul_rate(shapes, rows, getattr(torch, d), torch.device("cpu")) for d in args.peak_dtypes.split(",")}
    peak = max(peaks.values())
    print(f"{args.model}: {args.sequences} sequences of {args.min_len}-{args.max_len} tokens, "
          f"{torch.get_num_threads()} threads; matmul rate at the model's shapes ({rows} rows): "
          + ", ".join(f"{d} {r / 1e12:.3f} TFLOP/s" for d, r in peaks.items()))
    print(f"{'row':20s} {'s/step':>7s} {'first':>7s} {'tokens/s':>9s} {'padded':>7s} {'micro':>6s} {'fwd/step':>8s} "
          f"{'peak RSS':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'moved':>6s}")
    for r in results:
        r["mfu"] = r["model_flop_per_s"] / peak
        print(f"{r['row']:20s} {r['s_per_step']:7.2f} {r['first_step_s']:7.2f} {r['tokens_per_s']:9.0f} {r['padded_fraction']:7.1%} "
              f"{r['micro_batches']:6d} {r['forwards_per_step']:8d} {r['peak_rss_gb']:8.2f}G "
              f"{r['model_flop_per_s'] / 1e12:8.3f} {r['mfu']:6.1%} {r['weights_changed']:6.1%}")
    for r in results:
        if "breakdown" in r:
            print_breakdown(r["row"], r["breakdown"], peak)
    choice = auto_precision("cpu")
    default = next((r for r in results if r["row"] == DEFAULT_ROW[choice.precision]), None)
    if default is None:
        print(f"train_mfu below: the best row (the default path's row {DEFAULT_ROW[choice.precision]} was not run)")
        print(f"train_mfu={max(r['mfu'] for r in results):.3f}")
    else:
        print(f"train_mfu below: the configs' default path here, row {default['row']} "
              f"(precision: auto -> {choice.precision}, {choice.reason})")
        print(f"train_mfu={default['mfu']:.3f}")


if __name__ == "__main__":
    main()
