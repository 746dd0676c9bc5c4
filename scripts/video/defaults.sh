# shellcheck shell=bash
# Video-LLaVA defaults shared by scripts/video/{pretrain,finetune}.sh. Source it, do not run it.
# Every value is exported only when unset, so the environment still wins; the v1_5 stage scripts then
# fill whatever is left (learning rate, epochs, save settings) with LLaVA-1.5's values, which Video-LLaVA
# shares, and turn on the video path because VIDEO_TOWER is set.
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_ROOT="${DATA_ROOT:-playground/data/video-llava}"
export IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA_ROOT}"
export VIDEO_FOLDER="${VIDEO_FOLDER:-$DATA_ROOT}"
export VISION_TOWER="${VISION_TOWER:-openai/clip-vit-large-patch14}"
export VIDEO_TOWER="${VIDEO_TOWER:-$VISION_TOWER}"
export NUM_FRAMES="${NUM_FRAMES:-8}"
export MODEL_MAX_LENGTH="${MODEL_MAX_LENGTH:-3072}"
export RUN_GROUP="${RUN_GROUP:-video-llava-${COMPRESSION:-none}}"
export ZERO="${ZERO:-$SCRIPTS_DIR/zero2.json}"
