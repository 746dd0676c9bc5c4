#!/usr/bin/env bash
# Video-LLaVA stage 2: fine-tune projector + LLM on mixed image, video and text instructions (towers frozen).
# Recipe (7B, 8 GPUs): template v1, ZeRO-2, lr 2e-5, per-device batch 16, global batch 128, 1 epoch,
# 8 frames per video, tokenizer_model_max_length 3072, images padded to square, batches grouped by modality.
# VIDEO_TOWER defaults to the image tower (see scripts/video/pretrain.sh).
#
#   bash scripts/video/finetune.sh
#   PRETRAIN_DIR=runs/my-video-pretrain COMPRESSION=duet_video_53 bash scripts/video/finetune.sh
#   RESUME=auto bash scripts/video/finetune.sh                        # continue after preemption
#   DRY_RUN=1 bash scripts/video/finetune.sh --max_steps 4
# Settings, resume, wandb and multi-node launch: see scripts/v1_5/common.sh (VIDEO_* variables included).
set -euo pipefail

DATA_ROOT="${DATA_ROOT:-playground/data/video-llava}"
DATA_PATH="${DATA_PATH:-$DATA_ROOT/train_json/llava_image_tune_.json $DATA_ROOT/train_json/videochatgpt_tune_.json $DATA_ROOT/train_json/nlp_tune.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA_ROOT}"
VIDEO_FOLDER="${VIDEO_FOLDER:-$DATA_ROOT}"
VISION_TOWER="${VISION_TOWER:-openai/clip-vit-large-patch14}"
VIDEO_TOWER="${VIDEO_TOWER:-$VISION_TOWER}"
NUM_FRAMES="${NUM_FRAMES:-8}"
MODEL_MAX_LENGTH="${MODEL_MAX_LENGTH:-3072}"
# Video defaults above come first: common.sh only fills what is still unset (its image defaults).
# shellcheck source=scripts/v1_5/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../v1_5/common.sh"
OUTPUT_DIR="${OUTPUT_DIR:-runs/video-llava-7b}"
RUN_GROUP="${RUN_GROUP:-video-llava-$COMPRESSION}"
PRETRAIN_DIR="${PRETRAIN_DIR:-runs/video-llava-7b-pretrain}"
PRETRAINED_PROJECTOR="${PRETRAINED_PROJECTOR:-$PRETRAIN_DIR/mm_projector.safetensors}"
ZERO="${ZERO:-$REPO_ROOT/scripts/zero2.json}"
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
    --version v1 \
    "${PROJECTOR_ARGS[@]}" \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    "$@"
