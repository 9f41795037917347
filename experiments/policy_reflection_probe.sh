#!/usr/bin/env bash
# Does the policy reflect usefully? One exploration epoch on unseen Countdown tasks with the policy as reflector
# (the paper's schema): the console's "retries N → improved M" line is the policy's own retry-improvement rate.
#
#   experiments/policy_reflection_probe.sh MODEL OUT_DIR [TASKS]
#     MODEL: an HF model dir (e.g. runs/x/csv/version_0/hf_model) or the embedded name smollm2-135m-instruct
#
# Compare the embedded model with a policy trained with reflector: reference and sft_reflections: true (the
# solver's reports that led to a verified correction are then SFT samples of the policy):
#   r3l fit --config configs/countdown/r3l.yaml --data.explorer.init_args.sft_reflections true \
#           --trainer.default_root_dir runs/reflect-sft
#   experiments/policy_reflection_probe.sh smollm2-135m-instruct runs/probe-before
#   experiments/policy_reflection_probe.sh runs/reflect-sft/csv/version_0/hf_model runs/probe-after
set -euo pipefail
model=$1; out=$2; tasks=${3:-32}
cd "$(dirname "$0")/.."
# training tasks of another seed than the runs' (seed 0): none of them was trained on
r3l fit --config configs/countdown/r3l.yaml --config configs/methods/r3l_policy_reflector.yaml \
  --model.model_name_or_path "$model" \
  --data.train_tasks.init_args.seed 7 --data.tasks_per_epoch "$tasks" --data.groups_per_step 1 --trainer.limit_train_batches 1 \
  --trainer.max_epochs 1 --trainer.enable_checkpointing false \
  --trainer.callbacks '[{class_path: r3l_lightning.callbacks.ExplorationCallback}]' \
  --trainer.default_root_dir "$out" 2>&1 | grep -E "^epoch|^\[|Error"
