#!/usr/bin/env bash
# LLaVA-1.5 stage 1: train the mlp2x_gelu projector on LCS-558K captions (frozen CLIP and LLM).
# Recipe (7B, 8 GPUs): template plain, ZeRO-2, lr 1e-3, per-device batch 32, global batch 256, 1 epoch.
# The projector is saved as $OUTPUT_DIR/mm_projector.safetensors, which finetune.sh loads.
# A LLaVA-NeXT or LLaVA-OneVision checkpoint as MODEL: its projector alone, through its own chat template
# (e.g. after swapping in a new projector); Qwen2.5-VL's merger comes trained and is refused here.
#
#   bash scripts/v1_5/pretrain.sh                                   # full recipe
#   BATCH_SIZE=2 GRAD_ACCUM=1 bash scripts/v1_5/pretrain.sh --max_steps 4   # smoke run
#   DRY_RUN=1 bash scripts/v1_5/pretrain.sh                         # print the command only
# Settings and multi-node launch: see scripts/v1_5/common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ "$MODEL_FAMILY" != qwen2_5_vl ]] || die "Qwen2.5-VL checkpoints bring a trained merger: finetune them" \
    "with finetune.sh or finetune_lora.sh (pretraining here is a projector stage)"
TEMPLATE="${TEMPLATE:-plain}"
DATA_PATH="${DATA_PATH:-playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-playground/data/LLaVA-Pretrain/images}"
if [[ "$MODEL_FAMILY" == llava ]]; then
    OUTPUT_DIR="${OUTPUT_DIR:-runs/llava-v1.5-7b-pretrain}"
else
    OUTPUT_DIR="${OUTPUT_DIR:-runs/$(basename "$MODEL")-pretrain}"
fi
ZERO="${ZERO:-$REPO_ROOT/scripts/zero2.json}"
BATCH_SIZE="${BATCH_SIZE:-32}"
GLOBAL_BATCH="${GLOBAL_BATCH:-256}"
LR="${LR:-1e-3}"
EPOCHS="${EPOCHS:-1}"
SAVE_STEPS="${SAVE_STEPS:-24000}"
SAVE_TOTAL_LIMIT="${SAVE_TOTAL_LIMIT:-1}"

finalize_settings
common_train_args
launch "${COMMON_ARGS[@]}" \
    --tune_mm_mlp_adapter True \
    "$@"
