#!/usr/bin/env bash
# The playground pipeline, end to end, through the real launch scripts:
#   1. build the playground (tiny random CLIP tower + LLaMA, generated images and LLaVA JSON; no download)
#   2. check the data sets (missing/corrupt images, over-length samples, token statistics)
#   3. pretrain the projector  (scripts/v1_5/pretrain.sh, DeepSpeed ZeRO-2)
#   4. finetune LLM + projector (scripts/v1_5/finetune.sh; ZeRO-2 here, FINETUNE_ZERO=scripts/zero3.json for ZeRO-3)
#   5. batched generation with the trained checkpoint, and a plot of both stages' curves
# Without a GPU, DeepSpeed runs CPU ranks. Everything lands under RUNS_DIR.
#
#   bash scripts/playground/run.sh                      # defaults: 2 ranks, 1 epoch per stage
#   NUM_GPUS=1 MAX_STEPS=10 bash scripts/playground/run.sh
#   COMPRESSION=duet_192 RUNS_DIR=runs/playground-duet bash scripts/playground/run.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
PLAYGROUND_DIR="${PLAYGROUND_DIR:-playground/tiny}"
RUNS_DIR="${RUNS_DIR:-runs/playground}"
COMPRESSION="${COMPRESSION:-none}"
MAX_STEPS="${MAX_STEPS:--1}"
export NUM_GPUS="${NUM_GPUS:-2}"
export REPORT_TO="${REPORT_TO:-wandb}"
export WANDB_DIR="${WANDB_DIR:-$REPO_ROOT/$RUNS_DIR}"
export NUM_WORKERS="${NUM_WORKERS:-1}"
PYTHON="${PYTHON:-python}"
FINETUNE_EPOCHS="${FINETUNE_EPOCHS:-3}"
FINETUNE_ZERO="${FINETUNE_ZERO:-$REPO_ROOT/scripts/zero2.json}"

say() { printf '\n=== %s\n' "$*"; }

if [[ ! -f "$PLAYGROUND_DIR/manifest.json" ]]; then
    say "Building the playground in $PLAYGROUND_DIR"
    "$PYTHON" -m llava.tools.make_playground --out "$PLAYGROUND_DIR"
fi

say "Checking the data sets"
for stage in pretrain:plain finetune:v1; do
    "$PYTHON" -m llava.tools.check_data --data_path "$PLAYGROUND_DIR/${stage%%:*}.json" \
        --image_folder "$PLAYGROUND_DIR/images" --tokenizer "$PLAYGROUND_DIR/llm" \
        --version "${stage##*:}" --model_max_length 2048 --tokens_per_image 576
done

mkdir -p "$RUNS_DIR"
common=(MODEL="$PLAYGROUND_DIR/llm" VISION_TOWER="$PLAYGROUND_DIR/vision_tower"
    IMAGE_FOLDER="$PLAYGROUND_DIR/images" COMPRESSION="$COMPRESSION" BATCH_SIZE=8 GRAD_ACCUM=1)

say "Stage 1: pretraining the projector ($NUM_GPUS ranks)"
env "${common[@]}" DATA_PATH="$PLAYGROUND_DIR/pretrain.json" OUTPUT_DIR="$RUNS_DIR/pretrain" \
    RUN_NAME=playground-pretrain SAVE_STEPS=20 SAVE_TOTAL_LIMIT=2 \
    bash scripts/v1_5/pretrain.sh --max_steps "$MAX_STEPS" --learning_rate 2e-3

# ZeRO-3 (the 7B recipe) on CPU ranks spends most of a tiny model's step in per-module gathers, so the
# playground finetunes with ZeRO-2 by default; FINETUNE_ZERO=scripts/zero3.json runs the recipe's stage.
say "Stage 2: finetuning LLM + projector ($NUM_GPUS ranks, $(basename "$FINETUNE_ZERO"))"
env "${common[@]}" DATA_PATH="$PLAYGROUND_DIR/finetune.json" OUTPUT_DIR="$RUNS_DIR/finetune" ZERO="$FINETUNE_ZERO" \
    PRETRAINED_PROJECTOR="$RUNS_DIR/pretrain/mm_projector.safetensors" \
    RUN_NAME=playground-finetune SAVE_STEPS=20 SAVE_TOTAL_LIMIT=2 \
    bash scripts/v1_5/finetune.sh --max_steps "$MAX_STEPS" --learning_rate 2e-3 --num_train_epochs "$FINETUNE_EPOCHS"

say "Batched generation with the finetuned model"
"$PYTHON" -m llava.tools.generate --model "$RUNS_DIR/finetune" --max-new-tokens 24 --batch-size 4 \
    --image-folder "$PLAYGROUND_DIR/images" \
    --requests "$PLAYGROUND_DIR/demo_requests.jsonl" --out "$RUNS_DIR/answers.jsonl"

say "Training curves"
"$PYTHON" -m llava.tools.plot_curves "$RUNS_DIR/pretrain/metrics.jsonl" "$RUNS_DIR/finetune/metrics.jsonl" \
    --labels pretrain finetune --out "$RUNS_DIR/curves.png"

say "Done"
cat <<SUMMARY
  pretrained projector : $RUNS_DIR/pretrain/mm_projector.safetensors
  finetuned model      : $RUNS_DIR/finetune   (checkpoints: $RUNS_DIR/finetune/checkpoint-*)
  metrics (JSONL)      : $RUNS_DIR/pretrain/metrics.jsonl, $RUNS_DIR/finetune/metrics.jsonl
  wandb (offline runs) : $WANDB_DIR/wandb   (upload later: wandb sync <run dir>)
  curves               : $RUNS_DIR/curves.png
  answers              : $RUNS_DIR/answers.jsonl
SUMMARY
