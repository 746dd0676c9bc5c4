#!/usr/bin/env bash
# Video-LLaVA stage 1: train the mlp2x_gelu projector on image and video captions (frozen towers and LLM).
# Recipe (7B, 8 GPUs): template plain, ZeRO-2, lr 1e-3, per-device batch 32, global batch 256, 1 epoch,
# 8 frames per video, tokenizer_model_max_length 3072 (a video is 8 x 257 = 2056 visual tokens).
# The image and video towers are separate CLIP-L/14 (224 px) models feeding one projector; VIDEO_TOWER
# defaults to the image tower. (Video-LLaVA's LanguageBind towers are CLIP-shaped: use a CLIPVisionModel
# export of them, e.g. the towers of LanguageBind/Video-LLaVA-7B-hf, or start from that checkpoint.)
# The projector is saved as $OUTPUT_DIR/mm_projector.safetensors, which finetune.sh loads.
#
#   bash scripts/video/pretrain.sh
#   COMPRESSION=duet_video_53 bash scripts/video/pretrain.sh        # DUET during training
#   DRY_RUN=1 bash scripts/video/pretrain.sh                         # print the command only
# Settings, resume, wandb and multi-node launch: see scripts/v1_5/common.sh (VIDEO_* variables included).
set -euo pipefail

DATA_ROOT="${DATA_ROOT:-playground/data/video-llava}"
DATA_PATH="${DATA_PATH:-$DATA_ROOT/train_json/llava_image_.json $DATA_ROOT/train_json/valley_.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA_ROOT}"
VIDEO_FOLDER="${VIDEO_FOLDER:-$DATA_ROOT}"
VISION_TOWER="${VISION_TOWER:-openai/clip-vit-large-patch14}"
VIDEO_TOWER="${VIDEO_TOWER:-$VISION_TOWER}"
NUM_FRAMES="${NUM_FRAMES:-8}"
MODEL_MAX_LENGTH="${MODEL_MAX_LENGTH:-3072}"
# Video defaults above come first: common.sh only fills what is still unset (its image defaults).
# shellcheck source=scripts/v1_5/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../v1_5/common.sh"
OUTPUT_DIR="${OUTPUT_DIR:-runs/video-llava-7b-pretrain}"
RUN_GROUP="${RUN_GROUP:-video-llava-$COMPRESSION}"
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
    --version plain \
    --tune_mm_mlp_adapter True \
    "$@"
