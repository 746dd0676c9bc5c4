#!/usr/bin/env bash
# LLaVA-1.5 stage 2: full fine-tune of projector + LLM on the 665K instruction mix (CLIP frozen).
# Recipe (7B, 8 GPUs): template v1, ZeRO-3, lr 2e-5, per-device batch 16, global batch 128, 1 epoch,
# pad images to square, batches grouped by modality length.
#
#   bash scripts/v1_5/finetune.sh
#   PRETRAIN_DIR=runs/my-pretrain bash scripts/v1_5/finetune.sh
#   PRETRAINED_PROJECTOR=none bash scripts/v1_5/finetune.sh      # start from a fresh projector
#   MODEL=Qwen/Qwen2.5-VL-7B-Instruct COMPRESSION=qwen_duet_53 bash scripts/v1_5/finetune.sh   # Qwen2.5-VL
#   MODEL=llava-hf/llava-v1.6-vicuna-7b-hf COMPRESSION=anyres_duet_third bash scripts/v1_5/finetune.sh   # LLaVA-NeXT
#   DRY_RUN=1 bash scripts/v1_5/finetune.sh --max_steps 4
# Settings and multi-node launch: see scripts/v1_5/common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DATA_PATH="${DATA_PATH:-playground/data/llava_v1_5_mix665k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-playground/data}"
if [[ "$MODEL_FAMILY" == llava ]]; then
    OUTPUT_DIR="${OUTPUT_DIR:-runs/llava-v1.5-7b}"
else
    OUTPUT_DIR="${OUTPUT_DIR:-runs/$(basename "$MODEL")-finetune}"
fi
PRETRAIN_DIR="${PRETRAIN_DIR:-runs/llava-v1.5-7b-pretrain}"
if [[ "$MODEL_FAMILY" == llava ]]; then # Qwen2.5-VL / LLaVA-NeXT bring their trained projector
    PRETRAINED_PROJECTOR="${PRETRAINED_PROJECTOR:-$PRETRAIN_DIR/mm_projector.safetensors}"
fi
TEMPLATE="${TEMPLATE:-v1}"
ZERO="${ZERO:-$REPO_ROOT/scripts/zero3.json}"
BATCH_SIZE="${BATCH_SIZE:-16}"
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
LR="${LR:-2e-5}"
EPOCHS="${EPOCHS:-1}"
SAVE_STEPS="${SAVE_STEPS:-50000}"
SAVE_TOTAL_LIMIT="${SAVE_TOTAL_LIMIT:-1}"

finalize_settings
common_train_args
projector_args
launch "${COMMON_ARGS[@]}" \
    "${PROJECTOR_ARGS[@]}" \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    "$@"
