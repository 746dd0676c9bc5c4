#!/usr/bin/env bash
# The fast-generation targets (issue 14) on one GPU, in one go: inference speed of llava-7b at batch 1
# and 8 and of video-llava-7b at batch 1 and 4, both decode paths (eager reference, fast = static
# per-stage caches + CUDA-graph decode step) in the same run, every preset against none, and a prefill
# profile (host/device time, kernels and host syncs per region). Random weights at the real shapes, bf16,
# SDPA. Writes .json/.md(/.png) under OUT_DIR. About 6-8 minutes on an H100/H200.
#
#   bash scripts/bench/fast_generation_gpu.sh                 # OUT_DIR=runs/bench/fast-generation
#   OUT_DIR=$OUT NEW_TOKENS=64 bash scripts/bench/fast_generation_gpu.sh
#   SMOKE=1 bash scripts/bench/fast_generation_gpu.sh         # tiny shapes on CPU: checks the script runs
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
OUT_DIR="${OUT_DIR:-runs/bench/fast-generation}"
NEW_TOKENS="${NEW_TOKENS:-128}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT_DIR"

if [[ "${SMOKE:-0}" == "1" ]]; then
    IMAGE_SHAPE=small VIDEO_SHAPE=tiny-video NEW_TOKENS=4 REPEATS=1
    COMMON=(--device cpu --threads 1)
else
    IMAGE_SHAPE=llava-7b VIDEO_SHAPE=video-llava-7b REPEATS="${REPEATS:-5}"
    COMMON=(--dtype bf16 --attn-implementation sdpa)
fi
VIDEO_PRESETS=none,duet_video_53,duet_video_93
if [[ "$VIDEO_SHAPE" == tiny-video ]]; then
    VIDEO_PRESETS=none
fi

run() {
    echo "+ $*" >&2
    "$@"
}

run "$PYTHON" -m llava.bench.infer_speed --shape "$IMAGE_SHAPE" --batch-sizes 1,8 --prompt-tokens 64 \
    --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --decode-paths eager,fast "${COMMON[@]}" \
    --out "$OUT_DIR/$IMAGE_SHAPE-infer.json"
run "$PYTHON" -m llava.bench.infer_speed --shape "$VIDEO_SHAPE" --presets "$VIDEO_PRESETS" --batch-sizes 1,4 \
    --prompt-tokens 64 --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --decode-paths eager,fast "${COMMON[@]}" \
    --out "$OUT_DIR/$VIDEO_SHAPE-infer.json"
run "$PYTHON" -m llava.bench.prefill_profile --shape "$IMAGE_SHAPE" --batch-sizes 1,8 --repeats 3 "${COMMON[@]}" \
    --out "$OUT_DIR/$IMAGE_SHAPE-prefill-profile.json"
