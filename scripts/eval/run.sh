#!/usr/bin/env bash
# Evaluate a checkpoint on benchmarks (llava.eval.run): one process per GPU through torchrun, answers
# appended as they finish (re-running resumes), rank 0 merges and scores.
#
#   MODEL=runs/llava-v1.5-7b BENCHMARKS=textvqa,gqa,mme,pope,sqa PRESETS=none,duet_192 bash scripts/eval/run.sh
#   NUM_GPUS=8 MODEL=... bash scripts/eval/run.sh --limit 100     # extra arguments go to llava.eval.run
#   DRY_RUN=1 MODEL=... bash scripts/eval/run.sh                  # print the command only
#   PROTOCOL=strict EXPORT=official MODEL=... bash scripts/eval/run.sh   # scoring protocol, official-format export
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

: "${MODEL:?set MODEL to a checkpoint directory}"
EVAL_ROOT="${EVAL_ROOT:-playground/data/eval}"
BENCHMARKS="${BENCHMARKS:-textvqa,gqa,mme,pope,sqa}"
PRESETS="${PRESETS:-checkpoint}"
OUT="${OUT:-runs/eval/$(basename "$MODEL")}"
BATCH_SIZE="${BATCH_SIZE:-8}"
NUM_GPUS="${NUM_GPUS:-1}"
PYTHON="${PYTHON:-python}"
PROTOCOL="${PROTOCOL:-official}"  # official: the published scoring scripts; strict: this project's parsing
EXPORT="${EXPORT:-}"              # official: also write the answers in the official scripts' formats

ARGS=(--model "$MODEL" --root "$EVAL_ROOT" --benchmarks "$BENCHMARKS" --presets "$PRESETS" --out "$OUT"
    --batch-size "$BATCH_SIZE" --protocol "$PROTOCOL")
if [[ -n "$EXPORT" ]]; then
    ARGS+=(--export "$EXPORT")
fi
ARGS+=("$@")
if [[ "$NUM_GPUS" -gt 1 ]]; then
    CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS" -m llava.eval.run "${ARGS[@]}")
else
    CMD=("$PYTHON" -m llava.eval.run "${ARGS[@]}")
fi

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${CMD[@]}"
    printf '\n'
    exit 0
fi
exec "${CMD[@]}"
