#!/usr/bin/env bash
# PIPELINE=scenes (the default) is the mission in miniature: a tiny model that learns a held-out task,
# trained with and without DUET, evaluated with every preset, and the table with the training time saved
# (scripts/playground/scenes.sh; about 15 minutes on 2 CPU cores; results under runs/playground-scenes).
# PIPELINE=anyres is the same for LLaVA-NeXT (AnyRes tiles whose grid follows the image's aspect ratio): a tiny
# LLaVA-NeXT checkpoint finetuned with and without an AnyRes DUET preset, evaluated with every AnyRes preset
# (scripts/playground/anyres.sh; results under runs/playground-anyres).
#
# PIPELINE=image (faster, about 5 minutes) is the pipeline check, end to end, through the real launch scripts:
#   1. build the playground (tiny random CLIP tower + LLaMA, generated images and LLaVA JSON; no download)
#   2. check the data sets (missing/corrupt images, over-length samples, token statistics)
#   3. pretrain the projector  (scripts/v1_5/pretrain.sh, DeepSpeed ZeRO-2)
#   4. finetune LLM + projector (scripts/v1_5/finetune.sh; ZeRO-2 here, FINETUNE_ZERO=scripts/zero3.json for ZeRO-3)
#   5. batched generation with the trained checkpoint, and a plot of both stages' curves
# Without a GPU, DeepSpeed runs CPU ranks. Everything lands under RUNS_DIR.
# PIPELINE=video runs the Video-LLaVA pipeline instead: generated moving-shape videos (8 frames x 257 tokens
# through a tiny 224 px video tower) mixed with image and text samples, through scripts/video/*.sh.
#
#   bash scripts/playground/run.sh                      # scenes: train none + duet_128, evaluate, table
#   TRAIN_COMPRESSION=duet_64 bash scripts/playground/run.sh
#   PIPELINE=anyres bash scripts/playground/run.sh      # LLaVA-NeXT: train none + anyres_duet_third, table
#   PIPELINE=image bash scripts/playground/run.sh       # 2 ranks, 1 pretrain + 3 finetune epochs
#   PIPELINE=image NUM_GPUS=1 MAX_STEPS=10 bash scripts/playground/run.sh
#   PIPELINE=image COMPRESSION=duet_192 RUNS_DIR=runs/playground-duet bash scripts/playground/run.sh
#   PIPELINE=video bash scripts/playground/run.sh       # Video-LLaVA (runs/playground-video)
#   PIPELINE=video COMPRESSION=duet_video_53 RUNS_DIR=runs/playground-video-duet bash scripts/playground/run.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
PIPELINE="${PIPELINE:-scenes}"
case "$PIPELINE" in
    scenes) RUNS_DIR="${RUNS_DIR:-runs/playground-scenes}" ;;
    anyres) RUNS_DIR="${RUNS_DIR:-runs/playground-anyres}" ;;
    image) RUNS_DIR="${RUNS_DIR:-runs/playground}" ;;
    video) RUNS_DIR="${RUNS_DIR:-runs/playground-video}" ;;
    *) echo "PIPELINE must be scenes, anyres, image or video, got '$PIPELINE'" >&2; exit 2 ;;
esac
# Absolute and relative RUNS_DIR alike: a relative one is taken from the repository root.
[[ "$RUNS_DIR" == /* ]] || RUNS_DIR="$REPO_ROOT/$RUNS_DIR"
export REPORT_TO="${REPORT_TO:-wandb}"
export WANDB_DIR="${WANDB_DIR:-$RUNS_DIR}"
export NUM_WORKERS="${NUM_WORKERS:-1}"
PYTHON="${PYTHON:-python}"

say() { printf '\n=== %s\n' "$*"; }

if [[ "$PIPELINE" == scenes ]]; then
    mkdir -p "$RUNS_DIR"
    # shellcheck source=scripts/playground/scenes.sh
    source "$REPO_ROOT/scripts/playground/scenes.sh"
    exit 0
fi
if [[ "$PIPELINE" == anyres ]]; then
    mkdir -p "$RUNS_DIR"
    # shellcheck source=scripts/playground/anyres.sh
    source "$REPO_ROOT/scripts/playground/anyres.sh"
    exit 0
fi

PLAYGROUND_DIR="${PLAYGROUND_DIR:-playground/tiny}"
COMPRESSION="${COMPRESSION:-none}"
MAX_STEPS="${MAX_STEPS:--1}"
export NUM_GPUS="${NUM_GPUS:-2}"
if [[ "$PIPELINE" == video ]]; then FINETUNE_EPOCHS="${FINETUNE_EPOCHS:-2}"; else FINETUNE_EPOCHS="${FINETUNE_EPOCHS:-3}"; fi
FINETUNE_ZERO="${FINETUNE_ZERO:-$REPO_ROOT/scripts/zero2.json}"

if [[ ! -f "$PLAYGROUND_DIR/manifest.json" ]]; then
    say "Building the playground in $PLAYGROUND_DIR"
    "$PYTHON" -m llava.tools.make_playground --out "$PLAYGROUND_DIR"
elif [[ "$PIPELINE" == video && ! -f "$PLAYGROUND_DIR/video_pretrain.json" ]]; then
    say "Rebuilding the playground in $PLAYGROUND_DIR (it predates video support)"
    "$PYTHON" -m llava.tools.make_playground --out "$PLAYGROUND_DIR" --force
fi

if [[ "$PIPELINE" == video ]]; then
    # Video-LLaVA layout: 224 px image and video towers (256 tokens per image, 8 x 257 per video).
    PRETRAIN_JSON=video_pretrain.json FINETUNE_JSON=video_finetune.json DEMO=video_demo_requests.jsonl
    SCRIPTS=scripts/video TOKENS_PER_IMAGE=256 MAX_LENGTH=3072
    TOWERS=(VISION_TOWER="$PLAYGROUND_DIR/video_tower" VIDEO_TOWER="$PLAYGROUND_DIR/video_tower"
        VIDEO_FOLDER="$PLAYGROUND_DIR/videos" NUM_FRAMES=8 MODEL_MAX_LENGTH="$MAX_LENGTH")
    CHECK_VIDEO=(--video_folder "$PLAYGROUND_DIR/videos" --num_frames 8 --tokens_per_video $((8 * 257)))
    GENERATE_VIDEO=(--video-folder "$PLAYGROUND_DIR/videos")
else
    PRETRAIN_JSON=pretrain.json FINETUNE_JSON=finetune.json DEMO=demo_requests.jsonl
    SCRIPTS=scripts/v1_5 TOKENS_PER_IMAGE=576 MAX_LENGTH=2048
    TOWERS=(VISION_TOWER="$PLAYGROUND_DIR/vision_tower")
    CHECK_VIDEO=() GENERATE_VIDEO=()
fi

say "Checking the data sets"
for stage in "$PRETRAIN_JSON:plain" "$FINETUNE_JSON:v1"; do
    "$PYTHON" -m llava.tools.check_data --data_path "$PLAYGROUND_DIR/${stage%%:*}" \
        --image_folder "$PLAYGROUND_DIR/images" --tokenizer "$PLAYGROUND_DIR/llm" \
        --version "${stage##*:}" --model_max_length "$MAX_LENGTH" --tokens_per_image "$TOKENS_PER_IMAGE" \
        "${CHECK_VIDEO[@]}"
done

mkdir -p "$RUNS_DIR"
common=(MODEL="$PLAYGROUND_DIR/llm" "${TOWERS[@]}"
    IMAGE_FOLDER="$PLAYGROUND_DIR/images" COMPRESSION="$COMPRESSION" BATCH_SIZE=8 GRAD_ACCUM=1)

say "Stage 1: pretraining the projector ($PIPELINE, $NUM_GPUS ranks)"
env "${common[@]}" DATA_PATH="$PLAYGROUND_DIR/$PRETRAIN_JSON" OUTPUT_DIR="$RUNS_DIR/pretrain" \
    RUN_NAME="playground-$PIPELINE-pretrain" SAVE_STEPS=20 SAVE_TOTAL_LIMIT=2 \
    bash "$SCRIPTS/pretrain.sh" --max_steps "$MAX_STEPS" --learning_rate 2e-3

# ZeRO-3 (the 7B recipe) on CPU ranks spends most of a tiny model's step in per-module gathers, so the
# playground finetunes with ZeRO-2 by default; FINETUNE_ZERO=scripts/zero3.json runs the recipe's stage.
say "Stage 2: finetuning LLM + projector ($PIPELINE, $NUM_GPUS ranks, $(basename "$FINETUNE_ZERO"))"
env "${common[@]}" DATA_PATH="$PLAYGROUND_DIR/$FINETUNE_JSON" OUTPUT_DIR="$RUNS_DIR/finetune" ZERO="$FINETUNE_ZERO" \
    PRETRAINED_PROJECTOR="$RUNS_DIR/pretrain/mm_projector.safetensors" \
    RUN_NAME="playground-$PIPELINE-finetune" SAVE_STEPS=20 SAVE_TOTAL_LIMIT=2 \
    bash "$SCRIPTS/finetune.sh" --max_steps "$MAX_STEPS" --learning_rate 2e-3 --num_train_epochs "$FINETUNE_EPOCHS"

say "Batched generation with the finetuned model"
"$PYTHON" -m llava.tools.generate --model "$RUNS_DIR/finetune" --max-new-tokens 24 --batch-size 4 \
    --image-folder "$PLAYGROUND_DIR/images" "${GENERATE_VIDEO[@]}" \
    --requests "$PLAYGROUND_DIR/$DEMO" --out "$RUNS_DIR/answers.jsonl"

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
