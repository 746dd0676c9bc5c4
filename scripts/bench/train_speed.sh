#!/usr/bin/env bash
# Training-step speed per compression preset (llava.bench.train_speed): one model, presets switched
# in place, round-robin timing; writes OUT (.json), .md and .png.
#
#   bash scripts/bench/train_speed.sh                                   # small on CPU, llava-7b on a GPU
#   SHAPE=llava-7b STAGE=pretrain BATCH_SIZE=32 bash scripts/bench/train_speed.sh
#   PRESETS=none,duet_64 STEPS=10 bash scripts/bench/train_speed.sh --no-gradient-checkpointing
#   SHAPE=small-video bash scripts/bench/train_speed.sh               # one 8-frame video per sample (CPU)
#   SHAPE=video-llava-7b bash scripts/bench/train_speed.sh            # Video-LLaVA-7B (GPU)
#   DRY_RUN=1 bash scripts/bench/train_speed.sh      # print the command instead of running it
#   HF_BASELINE=1 bash scripts/bench/train_speed.sh  # add transformers' LlavaForConditionalGeneration as a row
# SHAPE: tiny, small, llava-7b, llava-13b (images) or tiny-video, small-video, video-llava-7b (each
# sample one video of 8 frames x 257 tokens; tiny-video 2 x 17). Video shapes default to
# PRESETS=none,duet_video_53,duet_video_93 and BATCH_SIZE 2 (CPU) / 4 (GPU).
# Extra arguments are passed to the Python module (later ones win).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

if nvidia-smi -L >/dev/null 2>&1; then
    DEFAULT_SHAPE=llava-7b
    DEFAULT_BATCH_SIZE=16
    VIDEO_BATCH_SIZE=4
else
    DEFAULT_SHAPE=small
    DEFAULT_BATCH_SIZE=4
    VIDEO_BATCH_SIZE=2
fi
SHAPE="${SHAPE:-$DEFAULT_SHAPE}"
DEFAULT_PRESETS=none,duet_192,duet_128,duet_64
case "$SHAPE" in
    *video*)
        DEFAULT_PRESETS=none,duet_video_53,duet_video_93
        DEFAULT_BATCH_SIZE=$VIDEO_BATCH_SIZE
        ;;
esac
STAGE="${STAGE:-finetune}"
PRESETS="${PRESETS:-$DEFAULT_PRESETS}"
BATCH_SIZE="${BATCH_SIZE:-$DEFAULT_BATCH_SIZE}"
STEPS="${STEPS:-5}"
WARMUP="${WARMUP:-2}"
OUT="${OUT:-runs/bench/${SHAPE}-${STAGE}.json}"
PYTHON="${PYTHON:-python}"

CMD=("$PYTHON" -m llava.bench.train_speed
    --shape "$SHAPE"
    --stage "$STAGE"
    --presets "$PRESETS"
    --batch-size "$BATCH_SIZE"
    --steps "$STEPS"
    --warmup "$WARMUP"
    --out "$OUT")
if [[ "${HF_BASELINE:-0}" == "1" ]]; then
    CMD+=(--hf-baseline)
fi
CMD+=("$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${CMD[@]}"
    printf '\n'
    exit 0
fi
mkdir -p "$(dirname "$OUT")"
exec "${CMD[@]}"
