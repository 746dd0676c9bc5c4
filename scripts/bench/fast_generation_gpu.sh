#!/usr/bin/env bash
# The fast-generation targets (issues 14 and 22) on one GPU, in one go and within one 10-minute command:
# inference speed of llava-7b at batch 1 and 8 and of video-llava-7b at batch 1 and 4, both decode paths
# (eager reference, fast = static per-stage caches + CUDA-graph decode step) in the same run, every preset
# against none, and a prefill profile (host/device time, kernels and host syncs per region). Random weights
# at the real shapes, bf16, SDPA. Every result goes under OUT_DIR: .json/.md rows (with graph: yes/no,
# captures and capture failures per row), .png charts only where matplotlib is installed, run.log, and
# timings.tsv (seconds and generate calls per command).
#
# Size: 16 image cases (4 presets x 2 batch sizes x 2 paths) and 12 video cases, each 1 untimed + REPEATS
# timed generate calls of NEW_TOKENS tokens: 112 + 84 calls at the defaults (64 new tokens, 3 repeats),
# about 4-6 minutes on an H100/H200 by estimate (eager decode at ~35 tok/s at batch 1 is most of it).
#
#   bash scripts/bench/fast_generation_gpu.sh                 # OUT_DIR=runs/bench/fast-generation
#   OUT_DIR=$OUT NEW_TOKENS=128 REPEATS=5 bash scripts/bench/fast_generation_gpu.sh   # the issue-14 setting (~10 min)
#   SMOKE=1 OUT_DIR=/tmp/fgsmoke bash scripts/bench/fast_generation_gpu.sh   # tiny shapes on CPU: the script runs
#   DECODE_PATHS=eager,fast,compiled bash ...   # also the torch.compile'd decode step (compiles once per shape)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
OUT_DIR="${OUT_DIR:-runs/bench/fast-generation}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/run.log") 2>&1

if [[ "${SMOKE:-0}" == "1" ]]; then
    IMAGE_SHAPE=small VIDEO_SHAPE=tiny-video NEW_TOKENS=4 REPEATS=1
    COMMON=(--device cpu --threads 1)
else
    IMAGE_SHAPE=llava-7b VIDEO_SHAPE=video-llava-7b NEW_TOKENS="${NEW_TOKENS:-64}" REPEATS="${REPEATS:-3}"
    COMMON=(--dtype bf16 --attn-implementation sdpa)
fi
IMAGE_PRESETS=none,duet_192,duet_128,duet_64
VIDEO_PRESETS=none,duet_video_53,duet_video_93
if [[ "$VIDEO_SHAPE" == tiny-video ]]; then
    VIDEO_PRESETS=none
fi
count() { local items; IFS=, read -ra items <<< "$1"; echo "${#items[@]}"; }  # entries of a comma list
printf 'command\tseconds\tgenerate_calls\n' > "$OUT_DIR/timings.tsv"
STARTED=$SECONDS

run() {  # run NAME CALLS COMMAND...: logs the command, times it, records it in timings.tsv
    local name="$1" calls="$2" began=$SECONDS
    shift 2
    echo "+ $*" >&2
    "$@"
    printf '%s\t%d\t%s\n' "$name" $((SECONDS - began)) "$calls" >> "$OUT_DIR/timings.tsv"
    echo "[$name: $((SECONDS - began)) s, $calls generate calls; $((SECONDS - STARTED)) s so far]" >&2
}

DECODE_PATHS="${DECODE_PATHS:-eager,fast}"
# generate calls = presets x batch sizes x decode paths x (1 untimed + REPEATS timed)
PATH_COUNT=$(count "$DECODE_PATHS")
IMAGE_CALLS=$(( $(count "$IMAGE_PRESETS") * 2 * PATH_COUNT * (1 + REPEATS) ))
VIDEO_CALLS=$(( $(count "$VIDEO_PRESETS") * 2 * PATH_COUNT * (1 + REPEATS) ))
echo "plan: $IMAGE_SHAPE $IMAGE_CALLS calls, $VIDEO_SHAPE $VIDEO_CALLS calls, $NEW_TOKENS new tokens each; out: $OUT_DIR" >&2

run "$IMAGE_SHAPE-infer" "$IMAGE_CALLS" "$PYTHON" -m llava.bench.infer_speed --shape "$IMAGE_SHAPE" \
    --presets "$IMAGE_PRESETS" --batch-sizes 1,8 --prompt-tokens 64 --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" \
    --decode-paths "$DECODE_PATHS" "${COMMON[@]}" --out "$OUT_DIR/$IMAGE_SHAPE-infer.json"
run "$VIDEO_SHAPE-infer" "$VIDEO_CALLS" "$PYTHON" -m llava.bench.infer_speed --shape "$VIDEO_SHAPE" \
    --presets "$VIDEO_PRESETS" --batch-sizes 1,4 --prompt-tokens 64 --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" \
    --decode-paths "$DECODE_PATHS" "${COMMON[@]}" --out "$OUT_DIR/$VIDEO_SHAPE-infer.json"
run "$IMAGE_SHAPE-prefill-profile" 0 "$PYTHON" -m llava.bench.prefill_profile --shape "$IMAGE_SHAPE" \
    --batch-sizes 1,8 --repeats 3 "${COMMON[@]}" --out "$OUT_DIR/$IMAGE_SHAPE-prefill-profile.json"
echo "done in $((SECONDS - STARTED)) s; results in $OUT_DIR" >&2
