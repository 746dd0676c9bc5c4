#!/usr/bin/env bash
# The mission in miniature (sourced by scripts/playground/run.sh, PIPELINE=scenes, the default):
#   1. build the scenes playground (336 px scenes, held-out benchmark, pretrained tiny tower and LLM)
#   2. check the data sets
#   3. train through the real scripts (scripts/v1_5/{pretrain,finetune}.sh, DeepSpeed ZeRO-2):
#      with COMPRESSION=none, and once per preset of TRAIN_COMPRESSION (on during both stages)
#   4. evaluate on the held-out benchmark with the real runner (llava.eval.compare): the `none` model
#      uncompressed and with every inference-only preset (DUET, VisionZip, PyramidDrop, DivPrune, VisPruner,
#      CDPruner, random drop at 192/128/64 tokens; random over EVAL_SEEDS), and each model trained with
#      compression at its own preset
#   5. print and save the table (Markdown, JSON, PNG): accuracy with its 95 % bootstrap interval, % of `none`,
#      McNemar p-value against `none` (≈: not significant), visual tokens per layer, prefill time, measured
#      training time of each run and the time saved
# Knobs: PLAYGROUND_DIR, RUNS_DIR, NUM_GPUS (ranks, default 1), TRAIN_COMPRESSION (duet_128; a comma list
# trains one model per preset, e.g. every method at 128 tokens: duet_128,visionzip_128,pdrop_128,divprune_128,
# vispruner_128,cdpruner_128,random_128),
# EVAL_PRESETS, EVAL_SEEDS (0,1,2: the random presets' seeds), PRETRAIN_EPOCHS, FINETUNE_EPOCHS (2; the longer
# run of docs/playground.md uses 6), MAX_STEPS, REPORT_TO.
# Expects from run.sh: REPO_ROOT, RUNS_DIR (absolute), PYTHON, say().

PLAYGROUND_DIR="${PLAYGROUND_DIR:-playground/scenes}"
TRAIN_COMPRESSION="${TRAIN_COMPRESSION:-duet_128}"
EVAL_PRESETS="${EVAL_PRESETS:-none,duet_192,duet_128,duet_64,visionzip_192,visionzip_128,visionzip_64,pdrop_192,pdrop_128,pdrop_64,divprune_192,divprune_128,divprune_64,vispruner_192,vispruner_128,vispruner_64,cdpruner_192,cdpruner_128,cdpruner_64,random_192,random_128,random_64}"
EVAL_SEEDS="${EVAL_SEEDS:-0,1,2}"
PRETRAIN_EPOCHS="${PRETRAIN_EPOCHS:-1}"
FINETUNE_EPOCHS="${FINETUNE_EPOCHS:-2}"
MAX_STEPS="${MAX_STEPS:--1}"
export NUM_GPUS="${NUM_GPUS:-1}"
IFS=, read -r -a train_presets <<< "$TRAIN_COMPRESSION"
for preset in "${train_presets[@]}"; do
    [[ -n "$preset" && "$preset" != none ]] || {
        echo "TRAIN_COMPRESSION must list compression presets (not none, no empty entry), got '$TRAIN_COMPRESSION'" >&2
        exit 2
    }
done

if [[ ! -f "$PLAYGROUND_DIR/manifest.json" ]]; then
    say "Building the scenes playground in $PLAYGROUND_DIR (tower and LLM pretraining included)"
    "$PYTHON" -m llava.tools.make_playground --task scenes --out "$PLAYGROUND_DIR"
elif ! grep -q '"task": "scenes"' "$PLAYGROUND_DIR/manifest.json"; then
    echo "$PLAYGROUND_DIR holds another playground; set PLAYGROUND_DIR or remove it" >&2
    exit 2
fi

say "Checking the data sets"
for data in pretrain.json finetune.json; do
    "$PYTHON" -m llava.tools.check_data --data_path "$PLAYGROUND_DIR/$data" --image_folder "$PLAYGROUND_DIR/images" \
        --tokenizer "$PLAYGROUND_DIR/llm" --version v1 --model_max_length 2048 --tokens_per_image 576
done

# One training run: stage 1 (projector only) then stage 2 (LLM + projector), both with $1 compression.
# Stage 1 uses the v1 template on short conversations: the tiny LLM knows questions, not captions.
train_run() {
    local compression="$1" out="$RUNS_DIR/$1"
    local common=(MODEL="$PLAYGROUND_DIR/llm" VISION_TOWER="$PLAYGROUND_DIR/vision_tower"
        IMAGE_FOLDER="$PLAYGROUND_DIR/images" COMPRESSION="$compression" BATCH_SIZE=8 GRAD_ACCUM=1
        ZERO="$REPO_ROOT/scripts/zero2.json" RUN_GROUP="playground-scenes" SAVE_STEPS=100 SAVE_TOTAL_LIMIT=1)
    say "[$compression] stage 1: aligning the projector ($NUM_GPUS ranks)"
    env "${common[@]}" DATA_PATH="$PLAYGROUND_DIR/pretrain.json" OUTPUT_DIR="$out/pretrain" \
        RUN_NAME="scenes-$compression-pretrain" EPOCHS="$PRETRAIN_EPOCHS" \
        bash scripts/v1_5/pretrain.sh --version v1 --learning_rate 2e-3 --max_steps "$MAX_STEPS" \
        --gradient_checkpointing False
    say "[$compression] stage 2: finetuning LLM + projector ($NUM_GPUS ranks)"
    env "${common[@]}" DATA_PATH="$PLAYGROUND_DIR/finetune.json" OUTPUT_DIR="$out/finetune" \
        PRETRAINED_PROJECTOR="$out/pretrain/mm_projector.safetensors" \
        RUN_NAME="scenes-$compression-finetune" EPOCHS="$FINETUNE_EPOCHS" \
        bash scripts/v1_5/finetune.sh --learning_rate 3e-3 --max_steps "$MAX_STEPS" --gradient_checkpointing False
}

train_run none
model_args=(--model "none=$RUNS_DIR/none/finetune"
    --train-time "none=$RUNS_DIR/none/pretrain/metrics.jsonl,$RUNS_DIR/none/finetune/metrics.jsonl")
curves=("$RUNS_DIR/none/finetune/metrics.jsonl")
for preset in "${train_presets[@]}"; do
    train_run "$preset"
    model_args+=(--model "trained_$preset=$RUNS_DIR/$preset/finetune@$preset"
        --train-time "trained_$preset=$RUNS_DIR/$preset/pretrain/metrics.jsonl,$RUNS_DIR/$preset/finetune/metrics.jsonl")
    curves+=("$RUNS_DIR/$preset/finetune/metrics.jsonl")
done

say "Evaluating on the held-out benchmark ($PLAYGROUND_DIR/eval/playground)"
"$PYTHON" -m llava.eval.compare --benchmarks playground --root "$PLAYGROUND_DIR/eval" --out "$RUNS_DIR/eval" \
    --presets "$EVAL_PRESETS" --seeds "$EVAL_SEEDS" --batch-size 16 --no-progress "${model_args[@]}"

say "Training curves"
"$PYTHON" -m llava.tools.plot_curves "${curves[@]}" --labels none "${train_presets[@]}" --out "$RUNS_DIR/curves.png"

say "Done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
cat <<SUMMARY
  table (Markdown/JSON/PNG): $RUNS_DIR/eval/table.md, table.json, table.png
  models                   : $RUNS_DIR/none/finetune, $RUNS_DIR/{${TRAIN_COMPRESSION}}/finetune
  answers and results      : $RUNS_DIR/eval/<model>/<preset>/playground/{answers*.jsonl,result.json}
  metrics (JSONL)          : $RUNS_DIR/<run>/{pretrain,finetune}/metrics.jsonl
  wandb (offline runs)     : $WANDB_DIR/wandb   (upload later: wandb sync <run dir>)
  finetune curves          : $RUNS_DIR/curves.png
SUMMARY
