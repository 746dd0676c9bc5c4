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
# This script only sets the Video-LLaVA defaults; scripts/v1_5/finetune.sh does the launch.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/video/defaults.sh
source "$HERE/defaults.sh"

export DATA_PATH="${DATA_PATH:-$DATA_ROOT/train_json/llava_image_tune_.json $DATA_ROOT/train_json/videochatgpt_tune_.json $DATA_ROOT/train_json/nlp_tune.json}"
export OUTPUT_DIR="${OUTPUT_DIR:-runs/video-llava-7b}"
export PRETRAIN_DIR="${PRETRAIN_DIR:-runs/video-llava-7b-pretrain}"
export BATCH_SIZE="${BATCH_SIZE:-16}"
export GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
exec bash "$HERE/../v1_5/finetune.sh" "$@"
