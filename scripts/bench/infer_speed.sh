#!/usr/bin/env bash
# Inference speed per compression preset and batch size (llava.bench.infer_speed): time to first
# token, decode tokens/s, peak memory, round-robin timing; writes OUT (.json), .md and .png.
#
#   bash scripts/bench/infer_speed.sh                                   # small on CPU, llava-7b on a GPU
#   SHAPE=llava-13b BATCH_SIZES=1,16 NEW_TOKENS=64 bash scripts/bench/infer_speed.sh
#   SHAPE=small-video bash scripts/bench/infer_speed.sh               # one 8-frame video per prompt (CPU)
#   DRY_RUN=1 bash scripts/bench/infer_speed.sh      # print the command instead of running it
#   HF_BASELINE=1 bash scripts/bench/infer_speed.sh  # add transformers' LlavaForConditionalGeneration.generate rows
#   DECODE_PATHS=fast bash scripts/bench/infer_speed.sh  # only the fast path (default: eager,fast, both timed)
# SHAPE: tiny, small, llava-7b, llava-13b (images) or tiny-video, small-video, video-llava-7b (each
# prompt one video of 8 frames x 257 tokens; tiny-video 2 x 17). Video shapes default to
# PRESETS=none,duet_video_53,duet_video_93 and BATCH_SIZES=1,4.
# Extra arguments are passed to the Python module (later ones win). STAGE only names the output
# file (default "infer"); BATCH_SIZE is accepted as an alias of BATCH_SIZES.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

if nvidia-smi -L >/dev/null 2>&1; then
    DEFAULT_SHAPE=llava-7b
else
    DEFAULT_SHAPE=small
fi
SHAPE="${SHAPE:-$DEFAULT_SHAPE}"
DEFAULT_PRESETS=none,duet_192,duet_128,duet_64
DEFAULT_BATCH_SIZES=1,8
case "$SHAPE" in
    *video*)
        DEFAULT_PRESETS=none,duet_video_53,duet_video_93
        DEFAULT_BATCH_SIZES=1,4
        ;;
esac
STAGE="${STAGE:-infer}"
PRESETS="${PRESETS:-$DEFAULT_PRESETS}"
BATCH_SIZES="${BATCH_SIZES:-${BATCH_SIZE:-$DEFAULT_BATCH_SIZES}}"
PROMPT_TOKENS="${PROMPT_TOKENS:-64}"
NEW_TOKENS="${NEW_TOKENS:-32}"
STEPS="${STEPS:-5}"
WARMUP="${WARMUP:-1}"
OUT="${OUT:-runs/bench/${SHAPE}-${STAGE}.json}"
PYTHON="${PYTHON:-python}"

CMD=("$PYTHON" -m llava.bench.infer_speed
    --shape "$SHAPE"
    --presets "$PRESETS"
    --batch-sizes "$BATCH_SIZES"
    --prompt-tokens "$PROMPT_TOKENS"
    --new-tokens "$NEW_TOKENS"
    --repeats "$STEPS"
    --warmup "$WARMUP"
    --decode-paths "${DECODE_PATHS:-eager,fast}"
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
