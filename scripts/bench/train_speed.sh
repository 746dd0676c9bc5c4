#!/usr/bin/env bash
# Training-step speed per compression preset (llava.bench.train_speed): one model, presets switched
# in place, round-robin timing; writes OUT (.json), .md and .png.
#
#   bash scripts/bench/train_speed.sh                                   # small on CPU, llava-7b on a GPU
#   SHAPE=llava-7b STAGE=pretrain BATCH_SIZE=32 bash scripts/bench/train_speed.sh
#   PRESETS=none,duet_64 STEPS=10 bash scripts/bench/train_speed.sh --no-gradient-checkpointing
#   DRY_RUN=1 bash scripts/bench/train_speed.sh      # print the command instead of running it
# Extra arguments are passed to the Python module (later ones win).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

if nvidia-smi -L >/dev/null 2>&1; then
    DEFAULT_SHAPE=llava-7b
    DEFAULT_BATCH_SIZE=16
else
    DEFAULT_SHAPE=small
    DEFAULT_BATCH_SIZE=4
fi
SHAPE="${SHAPE:-$DEFAULT_SHAPE}"
STAGE="${STAGE:-finetune}"
PRESETS="${PRESETS:-none,duet_192,duet_128,duet_64}"
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
    --out "$OUT"
    "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${CMD[@]}"
    printf '\n'
    exit 0
fi
mkdir -p "$(dirname "$OUT")"
exec "${CMD[@]}"
