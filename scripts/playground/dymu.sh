#!/usr/bin/env bash
# DyMU on the scenes playground, after the main job (`bash scripts/playground/run.sh`) trained the `none`
# model: calibrate DToMe thresholds for the playground's tower on its pretraining images at TARGETS tokens
# per image (CLS included), then evaluate that uncompressed-trained model on the held-out benchmark with
# DyMU's merged tokens packed into the LLM, with VTU (virtual token unmerging), and with duet_192/128 for
# comparison. Writes the thresholds, the presets and the table (.md/.json/.png) under OUT.
#
#   bash scripts/playground/dymu.sh                 # about 1 minute on 2 CPU cores
#   TARGETS=450,300 OUT=runs/dymu-pg bash scripts/playground/dymu.sh
# The playground tower runs 2 layers and each layer merges at most half its tokens: about 145 is the floor.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-python}"
PLAYGROUND_DIR="${PLAYGROUND_DIR:-playground/scenes}"
RUNS_DIR="${RUNS_DIR:-runs/playground-scenes}"
OUT="${OUT:-$RUNS_DIR/dymu}"
TARGETS="${TARGETS:-400,300,200}"
MODEL_DIR="$RUNS_DIR/none/finetune"
[[ -f "$MODEL_DIR/config.json" ]] || { echo "no trained model in $MODEL_DIR: run bash scripts/playground/run.sh first" >&2; exit 2; }

mkdir -p "$OUT/presets"
presets=none
IFS=, read -ra targets <<< "$TARGETS"
for target in "${targets[@]}"; do
    thresholds="$OUT/thresholds-$target.json"
    "$PYTHON" -m llava.tools.calibrate_dymu --vision_tower "$PLAYGROUND_DIR/vision_tower" \
        --data_path "$PLAYGROUND_DIR/pretrain.json" --image_folder "$PLAYGROUND_DIR/images" \
        --target "$target" --max_images 1000 --out "$thresholds" --no_progress
    printf 'name: dymu_%s\ndymu: {thresholds_file: %s}\n' "$target" "$thresholds" > "$OUT/presets/dymu_$target.yaml"
    printf 'name: dymu_%s_vtu\ndymu: {thresholds_file: %s, vtu: true}\n' "$target" "$thresholds" \
        > "$OUT/presets/dymu_${target}_vtu.yaml"
    presets+=",$OUT/presets/dymu_$target.yaml,$OUT/presets/dymu_${target}_vtu.yaml"
done
"$PYTHON" -m llava.eval.compare --benchmarks playground --root "$PLAYGROUND_DIR/eval" --out "$OUT/eval" \
    --presets "$presets,duet_192,duet_128" --batch-size 16 --no-progress --model "none=$MODEL_DIR"
