"""One GRPO workload through TRL's ``GRPOTrainer`` and through ours, side by side on this machine.

    pip install -e ".[bench]"        # TRL
    python benchmarks/vs_trl.py [--model smollm2-135m-instruct] [--steps 3] [--prompts 2] [--group 8] [--tokens 64]
                                [--rows trl-hf,ours-hf,ours-vllm,ours-vllm-kv2] [--kv-cache-gib G]

Same model (fp32 weights), same precision (`--precision`, default auto: the configs' choice on this machine; TRL
with `bf16=True` where ours is bf16-mixed), same Countdown prompts (the main job's tasks and system prompt, one attempt, free
decoding), group size, max new tokens, temperature 1, learning rate and number of optimizer steps; the
same GRPO loss settings (A = (R − R̄)/σ, clipped ratio ε = 0.2, k3 KL β = 0.01 to a frozen reference
model, token-mean). One optimizer step per generation batch in both, so neither recomputes old logprobs.
Rows: TRL with HF ``generate`` (its default without a vLLM server), ours with ``HFEngine``, ours with
``VLLMEngine`` (our default when vLLM is installed) with its KV cache sized to this workload
(:func:`~r3l_lightning.engines.vllm.kv_cache_gib_for`, or ``--kv-cache-gib``), and, as ``ours-vllm-kv2``
(not run by default), with the engine's default 2 GiB. Each row runs in a fresh process; per row it prints
the median seconds per RL step after one warm-up step, split into generation (time inside the model's /
engine's generate) and the rest (scoring, reference and policy forwards, backward, optimizer), generated
and trained tokens/s, and the peak RSS of the row's process tree (sampled every 0.1 s, vLLM's engine
process included). A second table gives each row's process-tree RSS at named phases (``PHASES``, each the
first time it is reached) and, in brackets, the peak since the previous phase: what each part of a row
(libraries, models, vLLM, first generate, first optimizer step) adds.

Last line: ``ours_over_trl_step_speed=<TRL's s/step ÷ ours with our default engine's s/step> (<our row> vs trl-hf)`` (ours-hf when
the default engine's row was not run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import psutil
from rows import print_row, run_row as row_in_fresh_process

from r3l_lightning.envs.countdown import CountdownEnv, CountdownTasks
from r3l_lightning.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("trl-hf", "ours-hf", "ours-vllm", "ours-vllm-kv2")
DEFAULT_ROWS = ("trl-hf", "ours-hf", "ours-vllm")
ENGINES = {"ours-hf": "r3l_lightning.engines.hf.HFEngine", "ours-vllm": "r3l_lightning.engines.vllm.VLLMEngine",
           "ours-vllm-kv2": "r3l_lightning.engines.vllm.VLLMEngine"}
PHASES = {  # phase: what the row's process tree holds when it is marked
    "imports": "python, torch, lightning, transformers (and TRL)",
    "models": "policy and GRPO reference model (TRL: its trainer too)",
    "vllm import": "vLLM's modules (vLLM rows)",
    "engine": "vLLM engine: its weights, KV cache, runtime (vLLM rows)",
    "first generate": "after the first generate call returns",
    "first step": "after the first RL step's optimizer step and zero_grad (AdamW state held)",
}
LR, BETA, EPSILON, TEMPERATURE = 1e-6, 0.01, 0.2, 1.0
# the main job's task distribution (configs/countdown/r3l.yaml), one attempt, no answer grammar (TRL has none)
ENV = CountdownEnv(max_attempts=1, response_format="answer", example=True)
TASKS = CountdownTasks(size=10000, seed=0, min_numbers=2, max_numbers=2, max_value=10, max_target=50)


def chat(index: int) -> list[dict]:
    """Task ``index``'s prompt as chat messages (TRL's dataset rows)."""
    return [{"role": "system", "content": ENV.system_prompt()},
            {"role": "user", "content": ENV.make_episode(TASKS[index]).reset()}]


def tree_rss() -> int:
    """Resident bytes of this process and all its descendants, summed."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a process that just ended
            pass
    return total


class PeakRSS:
    """Peak resident memory of this process tree (sampled every 0.1 s), and its RSS at named phases."""

    def __init__(self) -> None:
        self.peak = self.peak_since_mark = 0
        self.phases: dict[str, tuple[float, float]] = {}  # phase: (RSS GB at the mark, peak GB since the previous)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _record(self, rss: int) -> None:
        with self._lock:
            self.peak, self.peak_since_mark = max(self.peak, rss), max(self.peak_since_mark, rss)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self._record(tree_rss())

    def mark(self, phase: str) -> None:
        """Record the tree's RSS now and its peak since the previous mark (only the first mark of a phase counts)."""
        if phase in self.phases:
            return
        rss = tree_rss()
        self._record(rss)
        with self._lock:
            self.phases[phase] = (rss / 2**30, self.peak_since_mark / 2**30)
            self.peak_since_mark = rss

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


RSS: PeakRSS | None = None  # the running row's tracker (the CLI builds our callbacks from class paths)


def mark(phase: str) -> None:
    """Mark a phase of the running row (a no-op outside a row)."""
    if RSS is not None:
        RSS.mark(phase)


class Timer:
    """Wraps a generate function; accumulates its seconds and a count from each result, and marks the first
    call's end (phase ``first generate``)."""

    def __init__(self, generate, count) -> None:
        self.generate, self.count = generate, count
        self.seconds, self.tokens = 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.generate(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.tokens += self.count(out, *args, **kwargs)
        mark("first generate")
        return out


def summary(steps: list[dict]) -> dict:
    """Median over the steps after the first (warm-up)."""
    timed = steps[1:]
    seconds = statistics.median(s["seconds"] for s in timed)
    generation = statistics.median(s["generation_s"] for s in timed)
    return {"s_per_step": seconds, "generation_s": generation, "train_s": seconds - generation,
            "generated_per_s": sum(s["generated"] for s in timed) / sum(s["seconds"] for s in timed),
            "trained_per_s": sum(s["trained"] for s in timed) / sum(s["seconds"] for s in timed)}


# ----- TRL -------------------------------------------------------------------------------------------
def run_trl(args: argparse.Namespace) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r3l_lightning.models import resolve_model_path

    mark("imports")
    path = resolve_model_path(args.model)
    dataset = Dataset.from_dict({"prompt": [chat(i) for i in range(64)], "task_index": list(range(64))})

    def countdown_reward(completions, task_index, **_) -> list[float]:
        rewards = []
        for completion, index in zip(completions, task_index):
            episode = ENV.make_episode(TASKS[index])
            episode.reset()
            rewards.append(episode.step(completion[0]["content"]).reward)
        return rewards

    class Steps(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_step_begin(self, *_, **__) -> None:
            self.start, self.gen_s, self.tokens = time.perf_counter(), timer.seconds, timer.tokens

        def on_step_end(self, *_, **__) -> None:
            mark("first step")
            self.steps.append({"seconds": time.perf_counter() - self.start, "generation_s": timer.seconds - self.gen_s,
                               "generated": timer.tokens - self.tokens})

        def on_log(self, args, state, control, logs=None, **_) -> None:
            if logs and "num_tokens" in logs and self.steps:  # cumulative prompt + completion tokens trained
                self.steps[-1]["num_tokens"] = logs["num_tokens"]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps + 1, learning_rate=LR, beta=BETA, epsilon=EPSILON,
        loss_type="dapo", scale_rewards="group", num_generations=args.group,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        max_completion_length=args.tokens, temperature=TEMPERATURE, top_p=1.0, use_cpu=True, bf16=args.precision == "bf16-mixed",
        logging_steps=1, report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    callback = Steps()
    trainer = GRPOTrainer(model=model, reward_funcs=countdown_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])
    mark("models")
    pad = tokenizer.pad_token_id

    def generated(out, *_, **kwargs) -> int:  # completion tokens before the first EOS/pad
        completion = out[:, kwargs["input_ids"].shape[1]:]
        return int(((completion != pad) & (completion != tokenizer.eos_token_id)).sum())

    timer = Timer(model.generate, generated)
    model.generate = timer  # TRL calls the unwrapped model's generate (one CPU process: the model itself)
    trainer.train()
    previous = 0
    for step in callback.steps:
        step["trained"], previous = step.get("num_tokens", previous) - previous, step.get("num_tokens", previous)
    return callback.steps


# ----- ours ------------------------------------------------------------------------------------------
class StepClock(L.Callback):
    """One epoch = one RL step here (tasks_per_epoch = groups_per_step): its wall time, the engine's generate
    time within it, generated tokens and trained (non-padding) tokens; and the row's memory phases. Must be
    the first callback."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        mark("models")  # the module built the policy and the reference model
        engine = pl_module.rollout_engine
        if hasattr(engine, "_create"):  # VLLMEngine: created lazily, at its first use
            create = engine._create

            def create_marked() -> None:
                importlib.import_module("vllm")
                mark("vllm import")
                create()
                mark("engine")

            engine._create = create_marked
        self.timer = Timer(engine.generate, lambda out, *_, **__: sum(len(c.token_ids) for o in out for c in o))
        engine.generate = self.timer
        loss = pl_module.micro_batch_loss

        def counted(mb, *a, **kw):
            self.steps[-1]["trained"] += int(mb["attention_mask"].sum())
            return loss(mb, *a, **kw)

        pl_module.micro_batch_loss = counted

    def on_train_batch_end(self, *_, **__) -> None:  # one optimizer step per batch (training_step)
        mark("first step")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start, self.gen_s, self.tokens = time.perf_counter(), self.timer.seconds, self.timer.tokens
        self.steps.append({"trained": 0})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.steps[-1].update(seconds=time.perf_counter() - self.start, generation_s=self.timer.seconds - self.gen_s,
                              generated=self.timer.tokens - self.tokens)


def run_ours(args: argparse.Namespace) -> list[dict]:
    from r3l_lightning.cli import cli_main

    sys.modules.setdefault("vs_trl", sys.modules[__name__])  # the config's vs_trl.StepClock is this module's
    mark("imports")
    explorer = "data.explorer.init_args"
    engine = ["--model.engine", ENGINES[args.row]]
    if args.kv_cache_gib is not None:
        engine += ["--model.engine.init_args.kv_cache_gib", str(args.kv_cache_gib)]
    cli = cli_main([
        "fit", "--config", str(ROOT / "configs" / "countdown" / "r3l.yaml"),
        "--config", str(ROOT / "configs" / "methods" / "grpo.yaml"),
        "--model.model_name_or_path", args.model, "--model.lr", str(LR), *engine,
        "--trainer.precision", args.precision, "--model.model_dtype", "float32",
        "--data.environment.init_args.max_attempts", "1", "--data.environment.init_args.constrain_answer", "false",
        "--data.environment.init_args.bound_operands", "false",
        f"--{explorer}.group_size", str(args.group), f"--{explorer}.max_new_tokens", str(args.tokens),
        f"--{explorer}.temperature", str(TEMPERATURE),
        "--data.tasks_per_epoch", str(args.prompts), "--data.groups_per_step", str(args.prompts),
        "--data.rollout_log.every_n_epochs", "0",
        "--trainer.max_epochs", str(args.steps + 1), "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", tempfile.mkdtemp(),
        "--trainer.callbacks", "[{class_path: vs_trl.StepClock}, "
                               "{class_path: r3l_lightning.callbacks.ExplorationCallback, "
                               "init_args: {show_progress: false}}]",
    ])
    (clock,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "StepClock"]
    return clock.steps


def run_row(args: argparse.Namespace) -> dict:
    global RSS
    RSS = PeakRSS()
    steps = run_trl(args) if args.row == "trl-hf" else run_ours(args)
    return {"row": args.row, **summary(steps), "peak_rss_gb": RSS.stop(), "phases": RSS.phases, "steps": len(steps)}


def workload_kv_cache_gib(args: argparse.Namespace) -> float:
    """The KV cache (GiB) this workload needs: prompts × group concurrent sequences of the longest prompt (over
    the first 64 tasks) + ``--tokens``, in the engine's dtype, never less than vLLM accepts."""
    from transformers import AutoConfig, AutoTokenizer

    from r3l_lightning.engines.vllm import VLLMEngine, kv_cache_gib_for
    from r3l_lightning.models import resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    longest = max(len(tokenizer.apply_chat_template(chat(i), add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)) for i in range(64))
    engine = VLLMEngine()  # its defaults (dtype, max_model_len), as the row's config leaves them
    return kv_cache_gib_for(AutoConfig.from_pretrained(path), engine._engine_dtype(), args.prompts * args.group,
                            longest + args.tokens, engine.max_model_len)


def print_phases(results: dict[str, dict]) -> None:
    """The rows' RSS at each phase (peak since the previous phase in brackets), side by side."""
    print("process-tree RSS GB at each phase (peak since the previous phase):")
    print(f"{'phase':15s}" + "".join(f" {row:>15s}" for row in results))
    for phase in [*PHASES, "peak"]:
        cells = []
        for r in results.values():
            if phase == "peak":
                cells.append(f"{r['peak_rss_gb']:15.2f}")
            elif phase in r["phases"]:
                rss, peak = r["phases"][phase]
                cells.append(f"{f'{rss:.2f} ({peak:.2f})':>15s}")
            else:
                cells.append(f"{'-':>15s}")
        print(f"{phase:15s} " + " ".join(cells))
    for phase, meaning in PHASES.items():
        print(f"  {phase}: {meaning}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3, help="timed RL steps after one warm-up step")
    parser.add_argument("--prompts", type=int, default=2, help="prompts (groups) per RL step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per completion")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--kv-cache-gib", type=float,
                        help="ours-vllm's KV cache (default: sized to the workload; ours-vllm-kv2: 2)")
    parser.add_argument("--precision", default="auto", choices=("auto", "32-true", "bf16-mixed"),
                        help="both trainers' (TRL: bf16=True for bf16-mixed); auto: the configs' choice here")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    args.precision = resolve_precision(args.precision, "cpu")[0]
    if args.row:
        print_row(run_row(args))
        return
    rows = args.rows.split(",")
    for row in rows:
        if row not in ROWS:
            parser.error(f"--rows: unknown row {row!r}; options: {', '.join(ROWS)}")
    kv_cache_gib = {"ours-vllm-kv2": 2.0}
    if "ours-vllm" in rows:
        kv_cache_gib["ours-vllm"] = args.kv_cache_gib or workload_kv_cache_gib(args)
        print(f"ours-vllm KV cache: {kv_cache_gib['ours-vllm']} GiB"
              + (" (--kv-cache-gib)" if args.kv_cache_gib else
                 f" (sized: {args.prompts} × {args.group} sequences of the longest prompt + {args.tokens} tokens)"))
    print(f"load average before: {os.getloadavg()}")
    results = {}
    for row in rows:
        cmd = ["--row", row, "--model", args.model, "--steps", str(args.steps),
               "--prompts", str(args.prompts), "--group", str(args.group), "--tokens", str(args.tokens),
               "--precision", args.precision]
        if row in kv_cache_gib:
            cmd += ["--kv-cache-gib", str(kv_cache_gib[row])]
        results[row] = row_in_fresh_process(__file__, cmd)
    print(f"load average after: {os.getloadavg()}")
    print(f"{args.model}, GRPO, both trainers in {args.precision}: {args.prompts} prompts × {args.group} completions, ≤ {args.tokens} new tokens, "
          f"median of {args.steps} steps after a warm-up")
    print(f"{'row':13s} {'s/step':>7s} {'generate':>9s} {'rest':>7s} {'gen tok/s':>10s} {'train tok/s':>12s} "
          f"{'peak RSS':>9s}")
    for r in results.values():
        print(f"{r['row']:13s} {r['s_per_step']:7.2f} {r['generation_s']:9.2f} {r['train_s']:7.2f} "
              f"{r['generated_per_s']:10.1f} {r['trained_per_s']:12.1f} {r['peak_rss_gb']:8.2f}G")
    print_phases(results)
    default = "ours-vllm" if importlib.util.find_spec("vllm") is not None else "ours-hf"  # default_engine's choice
    ours = [r for r in (default, "ours-hf", "ours-vllm") if r in results]
    if "trl-hf" in results and ours:
        print(f"ours_over_trl_step_speed={results['trl-hf']['s_per_step'] / results[ours[0]]['s_per_step']:.2f} "
              f"({ours[0]} vs trl-hf)")


if __name__ == "__main__":
    main()
