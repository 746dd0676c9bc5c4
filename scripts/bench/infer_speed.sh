#!/usr/bin/env bash
# Inference speed per compression preset and batch size (llava.bench.infer_speed): time to first
# token, decode tokens/s, peak memory, round-robin timing; writes OUT (.json), .md and .png.
#
#   bash scripts/bench/infer_speed.sh                                   # small on CPU, llava-7b on a GPU
#   SHAPE=llava-13b BATCH_SIZES=1,16 NEW_TOKENS=64 bash scripts/bench/infer_speed.sh
#   DRY_RUN=1 bash scripts/bench/infer_speed.sh      # print the command instead of running it
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
STAGE="${STAGE:-infer}"
PRESETS="${PRESETS:-none,duet_192,duet_128,duet_64}"
BATCH_SIZES="${BATCH_SIZES:-${BATCH_SIZE:-1,8}}"
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
    --out "$OUT"
    "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${CMD[@]}"
    printf '\n'
    exit 0
fi
mkdir -p "$(dirname "$OUT")"
exec "${CMD[@]}"
