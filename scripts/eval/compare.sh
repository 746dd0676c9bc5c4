#!/usr/bin/env bash
# The accuracy-retained table (llava.eval.compare): every checkpoint x preset x benchmark, then
# OUT/table.{md,json,png}. MODELS holds checkpoints separated by spaces, each PATH or LABEL=PATH.
#
#   MODELS="base=runs/llava-v1.5-7b duet=runs/llava-v1.5-7b-duet192" bash scripts/eval/compare.sh
#   PRESETS=none,duet_192,duet_128,duet_64,visionzip_64,pdrop_64 MODELS=runs/llava-v1.5-7b bash scripts/eval/compare.sh
#   DRY_RUN=1 MODELS=... bash scripts/eval/compare.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

: "${MODELS:?set MODELS to one or more checkpoints (PATH or LABEL=PATH, space-separated)}"
EVAL_ROOT="${EVAL_ROOT:-playground/data/eval}"
BENCHMARKS="${BENCHMARKS:-textvqa,gqa,mme,pope,sqa}"
PRESETS="${PRESETS:-none,duet_192,duet_128,duet_64}"
OUT="${OUT:-runs/eval/compare}"
BATCH_SIZE="${BATCH_SIZE:-8}"
PYTHON="${PYTHON:-python}"

CMD=("$PYTHON" -m llava.eval.compare --root "$EVAL_ROOT" --benchmarks "$BENCHMARKS" --presets "$PRESETS"
    --out "$OUT" --batch-size "$BATCH_SIZE")
read -r -a MODEL_LIST <<< "$MODELS"
for model in "${MODEL_LIST[@]}"; do
    CMD+=(--model "$model")
done
CMD+=("$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${CMD[@]}"
    printf '\n'
    exit 0
fi
exec "${CMD[@]}"
