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
# This script only sets the Video-LLaVA defaults; scripts/v1_5/pretrain.sh does the launch.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/video/defaults.sh
source "$HERE/defaults.sh"

export DATA_PATH="${DATA_PATH:-$DATA_ROOT/train_json/llava_image_.json $DATA_ROOT/train_json/valley_.json}"
export OUTPUT_DIR="${OUTPUT_DIR:-runs/video-llava-7b-pretrain}"
export BATCH_SIZE="${BATCH_SIZE:-32}"
export GLOBAL_BATCH="${GLOBAL_BATCH:-256}"
exec bash "$HERE/../v1_5/pretrain.sh" "$@"
