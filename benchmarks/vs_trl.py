"""One GRPO workload through TRL's ``GRPOTrainer`` and through ours, side by side on this machine.

    pip install -e ".[bench]"        # TRL
    python benchmarks/vs_trl.py [--model smollm2-135m-instruct] [--steps 3] [--prompts 2] [--group 8] [--tokens 64]

Same model (fp32), same Countdown prompts (the main job's tasks and system prompt, one attempt, free
decoding), group size, max new tokens, temperature 1, learning rate and number of optimizer steps; the
same GRPO loss settings (A = (R − R̄)/σ, clipped ratio ε = 0.2, k3 KL β = 0.01 to a frozen reference
model, token-mean). One optimizer step per generation batch in both, so neither recomputes old logprobs.
Rows: TRL with HF ``generate`` (its default without a vLLM server), ours with ``HFEngine``, ours with
``VLLMEngine`` (our default when vLLM is installed). Each row runs in a fresh process; per row it prints
the median seconds per RL step after one warm-up step, split into generation (time inside the model's /
engine's generate) and the rest (scoring, reference and policy forwards, backward, optimizer), generated
and trained tokens/s, and the peak RSS of the row's process tree (sampled every 0.1 s, vLLM's engine
process included).

Last line: ``ours_over_trl_step_speed=<TRL's s/step ÷ ours with our default engine's s/step> (<our row> vs trl-hf)`` (ours-hf when
the default engine's row was not run).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import psutil
from rows import print_row, run_row as row_in_fresh_process

from r3l_lightning.envs.countdown import CountdownEnv, CountdownTasks

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("trl-hf", "ours-hf", "ours-vllm")
LR, BETA, EPSILON, TEMPERATURE = 1e-6, 0.01, 0.2, 1.0
# the main job's task distribution (configs/countdown/r3l.yaml), one attempt, no answer grammar (TRL has none)
ENV = CountdownEnv(max_attempts=1, response_format="answer", example=True)
TASKS = CountdownTasks(size=10000, seed=0, min_numbers=2, max_numbers=2, max_value=10, max_target=50)


class PeakRSS:
    """Peak resident memory of this process and all its descendants, summed, sampled every 0.1 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.1):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:  # a process that just ended
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


class Timer:
    """Wraps a generate function; accumulates its seconds and a count from each result."""

    def __init__(self, generate, count) -> None:
        self.generate, self.count = generate, count
        self.seconds, self.tokens = 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.generate(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.tokens += self.count(out, *args, **kwargs)
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

    path = resolve_model_path(args.model)
    prompts = [[{"role": "system", "content": ENV.system_prompt()},
                {"role": "user", "content": ENV.make_episode(TASKS[i]).reset()}] for i in range(64)]
    dataset = Dataset.from_dict({"prompt": prompts, "task_index": list(range(64))})

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
            self.steps.append({"seconds": time.perf_counter() - self.start, "generation_s": timer.seconds - self.gen_s,
                               "generated": timer.tokens - self.tokens})

        def on_log(self, args, state, control, logs=None, **_) -> None:
            if logs and "num_tokens" in logs and self.steps:  # cumulative prompt + completion tokens trained
                self.steps[-1]["num_tokens"] = logs["num_tokens"]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps + 1, learning_rate=LR, beta=BETA, epsilon=EPSILON,
        loss_type="dapo", scale_rewards="group", num_generations=args.group,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        max_completion_length=args.tokens, temperature=TEMPERATURE, top_p=1.0, use_cpu=True, bf16=False,
        logging_steps=1, report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    callback = Steps()
    trainer = GRPOTrainer(model=model, reward_funcs=countdown_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])
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
    time within it, generated tokens and trained (non-padding) tokens. Must be the first callback."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        engine = pl_module.rollout_engine
        self.timer = Timer(engine.generate, lambda out, *_, **__: sum(len(c.token_ids) for o in out for c in o))
        engine.generate = self.timer
        loss = pl_module.micro_batch_loss

        def counted(mb, *a, **kw):
            self.steps[-1]["trained"] += int(mb["attention_mask"].sum())
            return loss(mb, *a, **kw)

        pl_module.micro_batch_loss = counted

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start, self.gen_s, self.tokens = time.perf_counter(), self.timer.seconds, self.timer.tokens
        self.steps.append({"trained": 0})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.steps[-1].update(seconds=time.perf_counter() - self.start, generation_s=self.timer.seconds - self.gen_s,
                              generated=self.timer.tokens - self.tokens)


def run_ours(args: argparse.Namespace, engine: str) -> list[dict]:
    from r3l_lightning.cli import cli_main

    explorer = "data.explorer.init_args"
    cli = cli_main([
        "fit", "--config", str(ROOT / "configs" / "countdown" / "r3l.yaml"),
        "--config", str(ROOT / "configs" / "methods" / "grpo.yaml"),
        "--model.model_name_or_path", args.model, "--model.lr", str(LR), "--model.engine", engine,
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
    rss = PeakRSS()
    if args.row == "trl-hf":
        steps = run_trl(args)
    else:
        engine = {"ours-hf": "r3l_lightning.engines.hf.HFEngine", "ours-vllm": "r3l_lightning.engines.vllm.VLLMEngine"}
        steps = run_ours(args, engine[args.row])
    return {"row": args.row, **summary(steps), "peak_rss_gb": rss.stop(), "steps": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3, help="timed RL steps after one warm-up step")
    parser.add_argument("--prompts", type=int, default=2, help="prompts (groups) per RL step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per completion")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    if args.row:
        print_row(run_row(args))
        return
    results = {}
    for row in args.rows.split(","):
        if row not in ROWS:
            parser.error(f"--rows: unknown row {row!r}; options: {', '.join(ROWS)}")
        cmd = ["--row", row, "--model", args.model, "--steps", str(args.steps),
               "--prompts", str(args.prompts), "--group", str(args.group), "--tokens", str(args.tokens)]
        results[row] = row_in_fresh_process(__file__, cmd)
    print(f"{args.model}, GRPO: {args.prompts} prompts × {args.group} completions, ≤ {args.tokens} new tokens, "
          f"median of {args.steps} steps after a warm-up")
    print(f"{'row':10s} {'s/step':>7s} {'generate':>9s} {'rest':>7s} {'gen tok/s':>10s} {'train tok/s':>12s} "
          f"{'peak RSS':>9s}")
    for r in results.values():
        print(f"{r['row']:10s} {r['s_per_step']:7.2f} {r['generation_s']:9.2f} {r['train_s']:7.2f} "
              f"{r['generated_per_s']:10.1f} {r['trained_per_s']:12.1f} {r['peak_rss_gb']:8.2f}G")
    default = "ours-vllm" if importlib.util.find_spec("vllm") is not None else "ours-hf"  # default_engine's choice
    ours = [r for r in (default, "ours-hf", "ours-vllm") if r in results]
    if "trl-hf" in results and ours:
        print(f"ours_over_trl_step_speed={results['trl-hf']['s_per_step'] / results[ours[0]]['s_per_step']:.2f} "
              f"({ours[0]} vs trl-hf)")


if __name__ == "__main__":
    main()
