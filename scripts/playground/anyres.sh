#!/usr/bin/env bash
# LLaVA-NeXT (AnyRes) in miniature (sourced by scripts/playground/run.sh, PIPELINE=anyres):
#   1. build the AnyRes playground (the scenes task at wide, tall and square sizes, so the tile grid follows
#      the aspect ratio; a tiny LLaVA-NeXT checkpoint whose CLIP tower and LLM are pretrained like the scenes
#      playground's; 112 px views of 64 tokens: 200 / 208 / 336 visual tokens per wide / tall / square image)
#   2. check the data set
#   3. train twice through the real script (MODEL=<checkpoint> scripts/v1_5/finetune.sh, --version chat_template,
#      DeepSpeed ZeRO-2): with COMPRESSION=none, and with TRAIN_COMPRESSION (an AnyRes preset named by its
#      fraction, on during both stages). Stage 1 aligns the checkpoint's random projector alone
#      (finetune.sh --tune_mm_mlp_adapter True on pretrain.json: scripts/v1_5/pretrain.sh is LLaVA-1.5's
#      projector stage and refuses other families); stage 2 finetunes LLM + projector + image_newline from it
#      (PRETRAINED_PROJECTOR). PROJECTOR_STAGE=0 skips stage 1 (the projector then starts random in stage 2).
#   4. evaluate on the held-out benchmark with the real runner (llava.eval.compare): the `none` model
#      uncompressed and with every AnyRes preset (inference only), and the model trained with
#      TRAIN_COMPRESSION at that preset
#   5. print and save the table (Markdown, JSON, PNG): accuracy, % of `none`, visual tokens per layer,
#      prefill time, measured training time of each run and the time saved; the finetuning curves
# Knobs: PLAYGROUND_DIR, RUNS_DIR, NUM_GPUS (ranks, default 1), TRAIN_COMPRESSION (anyres_duet_third),
# EVAL_PRESETS, PROJECTOR_STAGE (1), PRETRAIN_EPOCHS, FINETUNE_EPOCHS, MAX_STEPS, EVAL_LIMIT (first N benchmark
# questions; 0: all), REPORT_TO.
# Expects from run.sh: REPO_ROOT, RUNS_DIR (absolute), PYTHON, say().

PLAYGROUND_DIR="${PLAYGROUND_DIR:-playground/anyres}"
TRAIN_COMPRESSION="${TRAIN_COMPRESSION:-anyres_duet_third}"
EVAL_PRESETS="${EVAL_PRESETS:-none,anyres_duet_third,anyres_duet_ninth,anyres_visionzip_third,anyres_pdrop_third,anyres_pdrop_ninth}"
PROJECTOR_STAGE="${PROJECTOR_STAGE:-1}"
PRETRAIN_EPOCHS="${PRETRAIN_EPOCHS:-1}"
FINETUNE_EPOCHS="${FINETUNE_EPOCHS:-2}"
MAX_STEPS="${MAX_STEPS:--1}"
EVAL_LIMIT="${EVAL_LIMIT:-0}"
export NUM_GPUS="${NUM_GPUS:-1}"
[[ "$TRAIN_COMPRESSION" != none ]] || { echo "TRAIN_COMPRESSION must be a compression preset, not none" >&2; exit 2; }

if [[ ! -f "$PLAYGROUND_DIR/manifest.json" ]]; then
    say "Building the AnyRes playground in $PLAYGROUND_DIR (tower and LLM pretraining included)"
    "$PYTHON" -m llava.tools.make_playground --task anyres --out "$PLAYGROUND_DIR"
elif ! grep -q '"task": "anyres"' "$PLAYGROUND_DIR/manifest.json"; then
    echo "$PLAYGROUND_DIR holds another playground; set PLAYGROUND_DIR or remove it" >&2
    exit 2
fi
MODEL_DIR="$PLAYGROUND_DIR/model"

say "Checking the data sets"
# The largest image's AnyRes token count (the square one's), as the builder measured it with the processor.
max_tokens="$("$PYTHON" -c 'import json, sys; print(max(json.load(open(sys.argv[1]))["anyres"]["tokens_per_image"].values()))' \
    "$PLAYGROUND_DIR/manifest.json")"
for data in pretrain.json finetune.json; do
    "$PYTHON" -m llava.tools.check_data --data_path "$PLAYGROUND_DIR/$data" --image_folder "$PLAYGROUND_DIR/images" \
        --tokenizer "$MODEL_DIR" --version chat_template --image_token '<image>' --model_max_length 2048 \
        --tokens_per_image "$max_tokens"
done

# One training run of the LLaVA-NeXT checkpoint with $1 compression: stage 1 (projector only, unless
# PROJECTOR_STAGE=0), stage 2 (LLM + projector + image_newline). Sets STAGE_METRICS (comma-separated).
train_run() {
    local compression="$1" out="$RUNS_DIR/$1"
    local common=(MODEL="$MODEL_DIR" IMAGE_FOLDER="$PLAYGROUND_DIR/images" COMPRESSION="$compression" BATCH_SIZE=8
        GRAD_ACCUM=1 ZERO="$REPO_ROOT/scripts/zero2.json" RUN_GROUP="playground-anyres" SAVE_STEPS=1000
        SAVE_TOTAL_LIMIT=1)
    local projector=()
    STAGE_METRICS="$out/finetune/metrics.jsonl"
    if [[ "$PROJECTOR_STAGE" == 1 ]]; then
        say "[$compression] stage 1: aligning the projector ($NUM_GPUS ranks)"
        env "${common[@]}" DATA_PATH="$PLAYGROUND_DIR/pretrain.json" OUTPUT_DIR="$out/pretrain" \
            RUN_NAME="anyres-$compression-pretrain" EPOCHS="$PRETRAIN_EPOCHS" \
            bash scripts/v1_5/finetune.sh --tune_mm_mlp_adapter True --learning_rate 2e-3 --max_steps "$MAX_STEPS" \
            --gradient_checkpointing False
        projector=(PRETRAINED_PROJECTOR="$out/pretrain/mm_projector.safetensors")
        STAGE_METRICS="$out/pretrain/metrics.jsonl,$STAGE_METRICS"
    fi
    say "[$compression] stage 2: finetuning LLM + projector + image_newline ($NUM_GPUS ranks)"
    env "${common[@]}" "${projector[@]}" DATA_PATH="$PLAYGROUND_DIR/finetune.json" OUTPUT_DIR="$out/finetune" \
        RUN_NAME="anyres-$compression-finetune" EPOCHS="$FINETUNE_EPOCHS" \
        bash scripts/v1_5/finetune.sh --learning_rate 3e-3 --max_steps "$MAX_STEPS" --gradient_checkpointing False
}

train_run none
none_metrics="$STAGE_METRICS"
train_run "$TRAIN_COMPRESSION"
trained_metrics="$STAGE_METRICS"

say "Evaluating on the held-out benchmark ($PLAYGROUND_DIR/eval/playground)"
trained="trained_$TRAIN_COMPRESSION"
limit=()
[[ "$EVAL_LIMIT" == 0 ]] || limit=(--limit "$EVAL_LIMIT")
"$PYTHON" -m llava.eval.compare --benchmarks playground --root "$PLAYGROUND_DIR/eval" --out "$RUNS_DIR/eval" \
    --presets "$EVAL_PRESETS" --batch-size 16 --no-progress "${limit[@]}" \
    --model "none=$RUNS_DIR/none/finetune" \
    --model "$trained=$RUNS_DIR/$TRAIN_COMPRESSION/finetune@$TRAIN_COMPRESSION" \
    --train-time "none=$none_metrics" --train-time "$trained=$trained_metrics"

say "Training curves"
"$PYTHON" -m llava.tools.plot_curves "$RUNS_DIR/none/finetune/metrics.jsonl" \
    "$RUNS_DIR/$TRAIN_COMPRESSION/finetune/metrics.jsonl" --labels none "$TRAIN_COMPRESSION" --out "$RUNS_DIR/curves.png"

say "Done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
cat <<SUMMARY
  table (Markdown/JSON/PNG): $RUNS_DIR/eval/table.md, table.json, table.png
  models                   : $RUNS_DIR/none/finetune, $RUNS_DIR/$TRAIN_COMPRESSION/finetune
  answers and results      : $RUNS_DIR/eval/<model>/<preset>/playground/{answers*.jsonl,result.json}
  metrics (JSONL)          : $RUNS_DIR/<run>/{pretrain,finetune}/metrics.jsonl
  wandb (offline runs)     : $WANDB_DIR/wandb   (upload later: wandb sync <run dir>)
  finetune curves          : $RUNS_DIR/curves.png
SUMMARY
