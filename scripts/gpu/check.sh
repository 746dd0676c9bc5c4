#!/usr/bin/env bash
# Every claim of this repo that needs a GPU, checked in one command on one H100/H200 within 8 minutes.
#
# Installs the project offline (wheels from WHEEL_DIR, made by scripts/gpu/prepare_wheels.sh where a package
# registry is reachable; torch and transformers are expected preinstalled), then runs, each as its own
# process under a time limit, highest priority first:
#   cuda_tests   the tests that skip without CUDA (real CUDA-graph replay against the eager step)
#   image_infer  llava-7b, fast decode path: decode tok/s of none at batch 1 / 8 (targets 141 / 1,103 tok/s,
#                transformers' static-cache compiled generate on an H200); every duet preset at least as fast
#                as none in time to first token and decode tok/s at batch 1 and 8; duet_64 prefill >= 3x at 8
#   train        llava-7b finetune step time per duet preset vs none (padded batches), against the FLOP model
#   train_ragged llava-7b finetune on a ragged batch (--length-mix llava665k): packed vs padded samples/s
#   video_infer  video-llava-7b, none / duet_video_53 / duet_video_93 (rows)
#   qwen_infer   Qwen2.5-VL-7B, none / qwen_duet_53 / qwen_duet_67 (rows)
#   dymu_infer   llava-7b with DyMU merging (thresholds fitted to the random tower, ~200 tokens) (rows)
#   selector_infer
#                llava-7b, the other token selectors at 64 tokens: none / visionzip_64 / divprune_64 /
#                vispruner_64 / cdpruner_64 (rows: time to first token with the selection in it, decode tok/s)
#   serve_playground, serve_model, serve_load
#                the OpenAI-compatible server under load (llava.bench.serve_load): a playground checkpoint (one
#                finetune step), served in-process; streamed requests at concurrency 8 and 1, none / duet_128
#                (rows: req/s, output tok/s, TTFT and inter-token latency, mean batch). Needs the serve extra's
#                wheels on the box (starlette, uvicorn, httpx; prepare_wheels.sh fetches them): without, serve_load
#                fails and the other parts are unaffected. Not yet run on a GPU; last by priority, so the budget guard
#                skips it first
# Random weights at the real shapes, bf16, SDPA. Everything goes under OUT_DIR: summary.md (PASS/FAIL per
# claim, measured number and target; also printed at the end), the benchmarks' .json/.md, logs/PART.log,
# timings.tsv (seconds per part, to resize), env.txt. A part that fails or runs out of time is marked in the
# summary; the next parts still run. Parts are not started once less than MIN_PART_S of BUDGET_S is left.
#
#   bash scripts/gpu/check.sh                         # OUT_DIR=$OUT (the device tool's) or runs/gpu-check
#   NEW_TOKENS=128 REPEATS=5 BUDGET_S=580 bash scripts/gpu/check.sh   # longer, steadier rows (~10 min)
#   SMOKE=1 OUT_DIR=/tmp/gpu-smoke bash scripts/gpu/check.sh   # CPU, tiny shapes, every part in one process
#   SMOKE=1 ONE_PROCESS=0 BUDGET_S=60 bash scripts/gpu/check.sh  # same, one process per part as on the GPU
#   SKIP_INSTALL=1 bash scripts/gpu/check.sh          # the environment is already set up
#
# Sizing at the defaults (NEW_TOKENS=64, REPEATS=3, TRAIN_STEPS=3, TRAIN_BATCH=16, fast decode path only):
# image 8 cases x 4 generate calls, video 6 x 4, qwen 6 x 4, dymu 4 x 3, selectors 10 x 4, train 4 presets x 4 steps,
# train_ragged 2 presets x 2 layouts x 4 steps, plus one model build per part (random init of a 7B model on the
# GPU). Estimated 6-8 minutes on an H200, not yet measured: the budget guard stops starting parts, and cuts the
# running one, at BUDGET_S (460 s) so the command ends within 8 minutes whatever the estimate's error;
# timings.tsv has the measured seconds per part (resize with the variables above, or drop parts with PARTS).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

OUT_DIR="${OUT_DIR:-${OUT:-runs/gpu-check}}"
SMOKE="${SMOKE:-0}"
WHEEL_DIR="${WHEEL_DIR:-wheels}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
ONE_PROCESS="${ONE_PROCESS:-$SMOKE}"  # run the parts in one Python process (SMOKE: one torch import, not seven)
INSTALL_DRY_RUN="${INSTALL_DRY_RUN:-$SMOKE}"  # print the pip commands only (SMOKE: this machine is set up)
BUDGET_S="${BUDGET_S:-460}"
MIN_PART_S="${MIN_PART_S:-30}"
DEFAULT_PARTS=cuda_tests,image_infer,train,train_ragged,video_infer,qwen_infer,dymu_infer,selector_infer
PARTS="${PARTS:-$DEFAULT_PARTS,serve_playground,serve_model,serve_load}"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    command -v python >/dev/null 2>&1 || PYTHON=python3
fi

mkdir -p "$OUT_DIR/logs"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOGS="$OUT_DIR/logs"
TIMINGS="$OUT_DIR/timings.tsv"
STARTED=$SECONDS
DEADLINE=$((STARTED + BUDGET_S))
printf 'part\tstatus\tseconds\tlimit_s\tcommand\n' > "$TIMINGS"
: > "$OUT_DIR/run.log"

note() {  # a progress line, on stderr and in run.log
    printf '[gpu-check %4d s] %s\n' $((SECONDS - STARTED)) "$*" | tee -a "$OUT_DIR/run.log" >&2
}

# ----- sizes -----
if [[ "$SMOKE" == "1" ]]; then
    # Tiny shapes on the CPU; the duet presets are rescaled to the tiny tower's 16 patches under the same names.
    IMAGE_SHAPE=tiny VIDEO_SHAPE=tiny-video QWEN_SHAPE=qwen-tiny
    NEW_TOKENS=3 REPEATS=1 WARMUP=0 TRAIN_STEPS=1 TRAIN_WARMUP=0 TRAIN_BATCH=2 PROMPT_TOKENS=16
    BIG_BATCH=2 VIDEO_BIG_BATCH=2 QWEN_IMAGE=112x112
    DEVICE=(--device cpu) THREADS=(--threads 1)
    PRESET_DIR="$OUT_DIR/presets"
    DYMU_LAYERS=1 DYMU_THRESHOLD=0.5
    SERVE_LOAD=(--requests 4 --concurrency 2 1 --max-tokens 4 --warmup 0 --device cpu)
else
    IMAGE_SHAPE=llava-7b VIDEO_SHAPE=video-llava-7b QWEN_SHAPE=qwen2.5-vl-7b
    NEW_TOKENS="${NEW_TOKENS:-64}" REPEATS="${REPEATS:-3}" WARMUP=0
    TRAIN_STEPS="${TRAIN_STEPS:-3}" TRAIN_WARMUP="${TRAIN_WARMUP:-1}" TRAIN_BATCH="${TRAIN_BATCH:-16}"
    PROMPT_TOKENS=64 BIG_BATCH=8 VIDEO_BIG_BATCH=4 QWEN_IMAGE=1008x756
    DEVICE=(--device cuda --dtype bf16 --attn-implementation sdpa) THREADS=()
    PRESET_DIR=""
    # CLIP-L/14-336 read at layer -2 runs 23 blocks. Thresholds fitted (calibrate_dymu's merge_top_edges, r = 16)
    # to a random-weight tower on random pixels: 0.44-0.48 per layer, about 195 tokens per image ("mid").
    DYMU_LAYERS=23 DYMU_THRESHOLD="${DYMU_THRESHOLD:-0.46}"
    SERVE_LOAD=(--requests "${SERVE_REQUESTS:-32}" --concurrency 8 1 --max-tokens "${SERVE_MAX_TOKENS:-32}"
        --device cuda)
fi
DECODE_PATHS="${DECODE_PATHS:-fast}"
export OUT_DIR SMOKE BIG_BATCH VIDEO_BIG_BATCH TRAIN_BATCH  # read by the summary

# ----- presets: the shipped ones, or (SMOKE) the same names rescaled to the tiny tower; DyMU from thresholds -----
preset() {  # preset NAME: the --presets entry of a shipped preset (a rescaled YAML in SMOKE mode)
    if [[ -n "$PRESET_DIR" ]]; then echo "$PRESET_DIR/$1.yaml"; else echo "$1"; fi
}
mkdir -p "$OUT_DIR/presets"
if [[ "$SMOKE" == "1" ]]; then
    for spec in "duet_192 6 2" "duet_128 5 2" "duet_64 3 1" "duet_video_53 6 2" "duet_video_93 3 1"; do
        read -r name dominant contextual <<< "$spec"
        cat > "$PRESET_DIR/$name.yaml" <<EOF
# $name rescaled to the tiny test tower (16 patches + CLS) for SMOKE=1; numbers mean nothing
name: $name
v2v: {method: duet, dominant: $dominant, contextual: $contextual, cluster_width: 4}
t2v: {boundaries: [0.5, 0.75], keep_ratios: [0.5, 0.0], query: salient, position_mode: keep}
EOF
    done
    # The other selectors at "64" on the tiny tower: 4 of its 17 tokens (CLS included), or a quarter of the patches.
    for spec in "visionzip_64 visionzip 3 1" "divprune_64 divprune 4 0" "vispruner_64 vispruner 4 0"; do
        read -r name method dominant contextual <<< "$spec"
        cat > "$PRESET_DIR/$name.yaml" <<EOF
# $name rescaled to the tiny test tower (16 patches + CLS) for SMOKE=1; numbers mean nothing
name: $name
v2v: {method: $method, dominant: $dominant, contextual: $contextual}
t2v: null
EOF
    done
    cat > "$PRESET_DIR/cdpruner_64.yaml" <<EOF
# cdpruner_64 rescaled to the tiny test tower (16 patches + CLS) for SMOKE=1; numbers mean nothing
name: cdpruner_64
v2v: null
t2v: {boundaries: [0.0], keep_ratios: [0.25], query: instruction, position_mode: keep, selector: dpp}
EOF
fi
THRESHOLDS="$DYMU_THRESHOLD"
for ((layer = 1; layer < DYMU_LAYERS; layer++)); do THRESHOLDS+=", $DYMU_THRESHOLD"; done
THRESHOLDS="[$THRESHOLDS]"
cat > "$OUT_DIR/presets/dymu_mid_random.yaml" <<EOF
# DyMU merging with thresholds for a random-weight tower (not a calibration of real CLIP weights)
name: dymu_mid_random
dymu: {thresholds: $THRESHOLDS}
EOF
# Not DyMU + T2V (dymu_mid_t2v.yaml's combination): infer_speed's FLOP column then fails (flops._t2v_scoring passes
# the measured mean N0, a float, to T2VConfig.kept_counts, which takes integers only).

# ----- offline install: wheels not yet installed, then the project itself (editable, no build isolation) -----
install_offline() {
    local began=$SECONDS status=ok
    "$PYTHON" - "$WHEEL_DIR" "$INSTALL_DRY_RUN" > "$LOGS/install.log" 2>&1 <<'PY' || status=failed
"""Install every wheel of WHEEL_DIR whose distribution is not installed (any version: the preinstalled torch
and transformers chose their dependencies' versions), then the project in editable mode; offline."""
import importlib.metadata as metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

wheel_dir, dry_run = Path(sys.argv[1]), sys.argv[2] == "1"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


installed = {norm(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
if not wheels:
    print(f"no wheels in {wheel_dir}/ (make them with scripts/gpu/prepare_wheels.sh where a registry is reachable)")
missing = []
for wheel in wheels:
    name, version = wheel.name.split("-")[:2]
    have = installed.get(norm(name))
    print(f"{name} {version}: " + (f"skipped, {have} installed" if have else "to install"))
    if not have:
        missing.append(str(wheel))
pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check"]
commands = [pip + missing] if missing else []
repo = Path.cwd().resolve()
try:
    direct = json.loads(metadata.distribution("duet-vlm").read_text("direct_url.json") or "{}")
except metadata.PackageNotFoundError:
    direct = {}
if direct.get("url", "").removeprefix("file://") == str(repo) and direct.get("dir_info", {}).get("editable"):
    print(f"duet-vlm: skipped, installed editable from {repo}")
else:
    commands.append(pip + ["--no-build-isolation", "-e", str(repo)])
failed = False
for command in commands:
    print("+", " ".join(command))
    if not dry_run and subprocess.run(command).returncode != 0:
        failed = True
        print("FAILED (the parts still run from the repository root, which is on sys.path with python -m)")
needed = ["torch", "transformers", "accelerate", "PIL", "yaml", "numpy", "safetensors", "tokenizers"]
absent = [module for module in needed if importlib.util.find_spec(module) is None]
print("missing modules: " + (", ".join(absent) if absent else "none"))
sys.exit(1 if failed or absent else 0)
PY
    printf 'install\t%s\t%d\t-\tinstall %s (dry run: %s)\n' "$status" $((SECONDS - began)) "$WHEEL_DIR" "$INSTALL_DRY_RUN" \
        >> "$TIMINGS"
    note "install: $status ($(tail -n 1 "$LOGS/install.log"))"
}

# ----- parts -----
QUEUE="$OUT_DIR/logs/.smoke-queue"
: > "$QUEUE"
part() {  # part NAME LIMIT_S MODULE ARGS...: python -m MODULE ARGS under a time limit (ONE_PROCESS: queued)
    local name="$1" limit="$2"
    shift 2
    [[ ",$PARTS," == *",$name,"* ]] || return 0
    if [[ "$ONE_PROCESS" == "1" ]]; then
        local IFS=$'\x1f'
        printf '%s\x1f%s\n' "$name" "$*" >> "$QUEUE"
        return 0
    fi
    local left=$((DEADLINE - SECONDS)) began=$SECONDS rc=0 status=ok
    if ((left < MIN_PART_S)); then
        printf '%s\tskipped\t0\t%d\t%s\n' "$name" "$limit" "$*" >> "$TIMINGS"
        note "skipped $name: $left s of the budget left"
        return 0
    fi
    ((limit <= left)) || limit=$left
    note "start $name (limit $limit s): $PYTHON -m $*"
    timeout --kill-after=10 "$limit" "$PYTHON" -m "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
    if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status="failed($rc)"; fi
    printf '%s\t%s\t%d\t%d\t%s\n' "$name" "$status" $((SECONDS - began)) "$limit" "$*" >> "$TIMINGS"
    note "end $name: $status in $((SECONDS - began)) s"
}

run_smoke_queue() {  # ONE_PROCESS: every queued part in this one Python process (one import of torch/transformers)
    "$PYTHON" - "$QUEUE" "$LOGS" "$TIMINGS" <<'PY'
"""Run queued ``python -m`` parts in this process, each logged to its own file, timed like the GPU parts."""
import contextlib
import logging
import runpy
import sys
import time
import traceback
from pathlib import Path

queue, logs, timings = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for line in queue.read_text().splitlines():
    name, module, *args = line.split("\x1f")
    began, status = time.perf_counter(), "ok"
    with open(logs / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        logging.root.handlers.clear()  # each part's basicConfig logs to its own file
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            if exit_.code not in (None, 0):
                status = f"failed({exit_.code})"
        except Exception:
            traceback.print_exc()
            status = "failed(1)"
    seconds = time.perf_counter() - began
    with timings.open("a") as out:
        out.write(f"{name}\t{status}\t{seconds:.1f}\t-\t{' '.join([module, *args])}\n")
    print(f"{name}: {status} in {seconds:.1f} s", file=sys.stderr)
PY
}

note "out: $OUT_DIR; budget $BUDGET_S s; smoke: $SMOKE; parts: $PARTS"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c 'import importlib.metadata as m, sys; print(sys.version.split()[0], *(f"{p} {m.version(p)}" for p in ("torch", "transformers")))' 2>&1 || true
} > "$OUT_DIR/env.txt"
if [[ "$SKIP_INSTALL" != "1" ]]; then
    install_offline
fi

# Tests that skip without CUDA (skipif on torch.cuda.is_available()), and `-m cuda` where that marker exists.
mapfile -t CUDA_TEST_FILES < <(grep -lE 'skipif\(\s*not torch\.cuda\.is_available' tests/test_*.py || true)
CUDA_TEST_ARGS=(-q -rs -p no:cacheprovider --junitxml "$OUT_DIR/cuda-tests.xml")
if [[ "$SMOKE" == "1" ]]; then
    CUDA_TEST_ARGS+=(-k cuda)  # the files' CPU tests run in the suite anyway
fi
if "$PYTHON" -c 'import sys, tomllib; sys.exit(0 if any(m.startswith("cuda") for m in tomllib.load(open("pyproject.toml", "rb")).get("tool", {}).get("pytest", {}).get("ini_options", {}).get("markers", [])) else 1)' 2>/dev/null; then
    CUDA_TEST_FILES+=(-m cuda tests)
fi
if ((${#CUDA_TEST_FILES[@]})); then
    part cuda_tests 90 pytest "${CUDA_TEST_ARGS[@]}" "${CUDA_TEST_FILES[@]}"
fi

INFER=(--prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --warmup "$WARMUP"
    --decode-paths "$DECODE_PATHS" "${DEVICE[@]}" "${THREADS[@]}")
part image_infer 150 llava.bench.infer_speed --shape "$IMAGE_SHAPE" \
    --presets "none,$(preset duet_192),$(preset duet_128),$(preset duet_64)" --batch-sizes "1,$BIG_BATCH" \
    "${INFER[@]}" --out "$OUT_DIR/image-infer.json"

TRAIN=(--shape "$IMAGE_SHAPE" --stage finetune --batch-size "$TRAIN_BATCH" --steps "$TRAIN_STEPS"
    --warmup "$TRAIN_WARMUP" --gradient-checkpointing "${DEVICE[@]}" "${THREADS[@]}")
part train 150 llava.bench.train_speed "${TRAIN[@]}" \
    --presets "none,$(preset duet_192),$(preset duet_128),$(preset duet_64)" --out "$OUT_DIR/train-padded.json"
# Padded vs packed (padding-free) on the same ragged batch drawn from LLaVA-1.5's instruction mix.
part train_ragged 150 llava.bench.train_speed "${TRAIN[@]}" --presets "none,$(preset duet_128)" \
    --length-mix llava665k --packing both --out "$OUT_DIR/train-ragged.json"

part video_infer 120 llava.bench.infer_speed --shape "$VIDEO_SHAPE" \
    --presets "none,$(preset duet_video_53),$(preset duet_video_93)" --batch-sizes "1,$VIDEO_BIG_BATCH" \
    "${INFER[@]}" --out "$OUT_DIR/video-infer.json"

part qwen_infer 120 llava.bench.qwen_speed --shape "$QWEN_SHAPE" --presets none,qwen_duet_53,qwen_duet_67 \
    --batch-sizes "1,$BIG_BATCH" --image-size "$QWEN_IMAGE" --prompt-tokens "$PROMPT_TOKENS" \
    --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --decode-paths "$DECODE_PATHS" "${DEVICE[@]}" \
    --out "$OUT_DIR/qwen-infer.json"

part dymu_infer 90 llava.bench.infer_speed --shape "$IMAGE_SHAPE" \
    --presets "none,$OUT_DIR/presets/dymu_mid_random.yaml" \
    --batch-sizes "1,$BIG_BATCH" --prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" \
    --repeats "$((REPEATS > 2 ? 2 : REPEATS))" --warmup "$WARMUP" --decode-paths "$DECODE_PATHS" \
    "${DEVICE[@]}" "${THREADS[@]}" --out "$OUT_DIR/dymu-infer.json"

# The published selectors this repository implements besides DUET, at 64 tokens (duet_64 is image_infer's).
part selector_infer 150 llava.bench.infer_speed --shape "$IMAGE_SHAPE" \
    --presets "none,$(preset visionzip_64),$(preset divprune_64),$(preset vispruner_64),$(preset cdpruner_64)" \
    --batch-sizes "1,$BIG_BATCH" "${INFER[@]}" --out "$OUT_DIR/selector-infer.json"

# The server under load: a playground checkpoint (tiny towers and LLM, one finetune step at a tiny learning rate, so
# its answers stay long and varied), served in-process on the loopback address with its demo images as data: URLs.
SERVE_DIR="$OUT_DIR/serve"
part serve_playground 60 llava.tools.make_playground --out "$SERVE_DIR/playground" --num-pretrain 2 \
    --num-finetune 12 --num-video-pretrain 0 --num-video-finetune 0 --seed 0 --force
part serve_model 90 llava.training.train --model_name_or_path "$SERVE_DIR/playground/llm" \
    --vision_tower "$SERVE_DIR/playground/vision_tower" --image_folder "$SERVE_DIR/playground/images" \
    --data_path "$SERVE_DIR/playground/finetune.json" --output_dir "$SERVE_DIR/model" --version v1 \
    --per_device_train_batch_size 1 --max_steps 1 --save_strategy no --learning_rate 1e-7 \
    --group_by_modality_length False --logging_steps 1 --report_to none --dataloader_num_workers 0 --seed 42
part serve_load 120 llava.bench.serve_load --model "$SERVE_DIR/model" --presets none duet_128 "${SERVE_LOAD[@]}" \
    --request-timeout-s 60 --timeout-s 100 --out "$OUT_DIR/serve-load.json"

if [[ "$ONE_PROCESS" == "1" ]]; then
    run_smoke_queue
fi

# ----- summary: PASS/FAIL per claim with the measured number and the target -----
SUMMARY_BEGAN=$SECONDS
"$PYTHON" - <<'PY'
"""Read the parts' JSON rows, JUnit XML and logs; write summary.md: one row per claim (PASS/FAIL, measured,
target), NOT RUN for a claim whose part failed, ran out of time or was not started, and rows without a target."""
import json
import math
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

out = Path(os.environ["OUT_DIR"])
smoke = os.environ["SMOKE"] == "1"
big, video_big = int(os.environ["BIG_BATCH"]), int(os.environ["VIDEO_BIG_BATCH"])
DECODE_B1, DECODE_BIG = 141.0, 1103.0  # tok/s: transformers' static-cache compiled generate, H200, batch 1 / 8
PREFILL_DUET_64 = 3.0  # duet_64 prefill speed-up over none at batch 8
TRAIN_SLACK = 1.25  # a preset's step-time ratio to none may exceed the FLOP model's by 25 %
DUET = ("duet_192", "duet_128", "duet_64")
status_of = {}
for line in (out / "timings.tsv").read_text().splitlines()[1:]:
    fields = line.split("\t")
    status_of[fields[0]] = fields[1]
claims: list[tuple[str, str, str, str, str]] = []  # (id, claim, status, measured, target)
infos: list[tuple[str, str, str]] = []  # (part, row, measured)


def rows(name: str) -> list[dict] | None:
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


def not_run(part: str) -> str:
    status = status_of.get(part, "not started")
    log = f", see logs/{part}.log" if (out / "logs" / f"{part}.log").exists() else ""
    return f"NOT RUN ({part}: {status}{log})"


def claim(key: str, text: str, value: float | None, target: float, unit: str, at_least: bool = True,
          missing: str | None = None) -> None:
    """One claim row; ``missing`` (the part's NOT RUN status) when its part left no rows."""
    bound = f"{'>=' if at_least else '<='} {target:.4g}{unit}" if math.isfinite(target) else "-"
    if missing is not None:
        claims.append((key, text, missing, "-", bound))
    elif value is None or not math.isfinite(value) or not math.isfinite(target):
        claims.append((key, text, "FAIL", "no value", bound))
    else:
        passed = value >= target if at_least else value <= target
        note = "" if passed or abs(value - target) > 0.02 * abs(target) else " (within 2 %: noise?)"
        claims.append((key, text, ("PASS" if passed else "FAIL") + note, f"{value:.4g}{unit}", bound))


def pick(table: list[dict] | None, preset: str, batch: int | None = None, path: str | None = None) -> dict | None:
    return next((row for row in table or [] if row["preset"] == preset
                 and batch in (None, row.get("batch_size")) and path in (None, row.get("path"))), None)


def value(row: dict | None, key: str) -> float | None:
    return None if row is None or row.get(key) is None else float(row[key])


# Fast generation, llava-7b, fast decode path.
image = rows("image-infer.json")
missing = None if image is not None else not_run("image_infer")
claim("decode_none_b1", "none decode tok/s, batch 1", value(pick(image, "none", 1, "fast"), "decode_tokens_per_s"),
      DECODE_B1, " tok/s", missing=missing)
claim(f"decode_none_b{big}", f"none decode tok/s, batch {big}",
      value(pick(image, "none", big, "fast"), "decode_tokens_per_s"), DECODE_BIG, " tok/s", missing=missing)
for preset in DUET:
    for batch in (1, big):
        row = pick(image, preset, batch, "fast")
        claim(f"ttft_{preset}_b{batch}", f"{preset} prefill speed-up vs none (TTFT), batch {batch}",
              value(row, "prefill_speedup_vs_none"), 1.0, "x", missing=missing)
        claim(f"decode_{preset}_b{batch}", f"{preset} decode speed-up vs none (tok/s), batch {batch}",
              value(row, "decode_speedup_vs_none"), 1.0, "x", missing=missing)
claim(f"prefill_duet_64_b{big}", f"duet_64 prefill speed-up vs none, batch {big}",
      value(pick(image, "duet_64", big, "fast"), "prefill_speedup_vs_none"), PREFILL_DUET_64, "x", missing=missing)

# CUDA graphs used, and their first replay accepted, in every fast-path row of every inference part.
fast_rows = [row for name in ("image-infer.json", "video-infer.json", "dymu-infer.json", "selector-infer.json")
             for row in (rows(name) or []) if row.get("path") == "fast"]
mismatches = sum(log.read_text(errors="replace").count("first replay differs from the eager step")
                 for log in (out / "logs").glob("*.log"))
with_graph = sum(row.get("graph") == "yes" for row in fast_rows)
failures = sum(row.get("capture_failures") or 0 for row in fast_rows)
graphs_ok = with_graph == len(fast_rows) and failures == 0 and mismatches == 0
claims.append(("graphs", "fast rows on CUDA graphs only; capture failures; first-replay mismatches",
               ("PASS" if graphs_ok else "FAIL") if fast_rows else not_run("image_infer"),
               f"{with_graph}/{len(fast_rows)} rows; {failures}; {mismatches}", "all rows; 0; 0"))

# Training step ratios, padded batches of equal length.
train = rows("train-padded.json")
missing = None if train is not None else not_run("train")
for preset in DUET:
    row = pick(train, preset)
    flops = value(row, "flops_ratio_vs_none")
    described = "" if flops is None else f"; FLOP model {flops:.3f}, limit {TRAIN_SLACK}x it"
    claim(f"train_{preset}", f"{preset} finetune step time / none (batch {os.environ['TRAIN_BATCH']}, padded"
          f"{described})", value(row, "ratio_vs_none"), TRAIN_SLACK * flops if flops else math.nan, "",
          at_least=False, missing=missing)

# Packed vs padded on the same ragged batch.
ragged = rows("train-ragged.json")
missing = None if ragged is not None else not_run("train_ragged")
for preset in ("none", "duet_128"):
    padded, packed = pick(ragged, preset), pick(ragged, f"{preset} packed")
    speeds = (value(packed, "samples_per_s"), value(padded, "samples_per_s"))
    share = value(padded, "padding_fraction")
    claim(f"train_packed_{preset}", f"{preset} packed / padded samples/s (llava665k ragged batch"
          + ("" if share is None else f"; padding {share:.0%} of the padded LLM input") + ")",
          speeds[0] / speeds[1] if None not in speeds and speeds[1] else None, 1.0, "x", missing=missing)

# CUDA-only tests.
xml = out / "cuda-tests.xml"
if xml.exists():
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    status = "PASS" if failed == 0 and skipped == 0 and total > 0 else "FAIL"
    if smoke and failed == 0 and skipped:
        status = "SKIPPED on the CPU"
    claims.append(("cuda_tests", "tests that skip without CUDA", status,
                   f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped", "all pass, 0 skipped"))
else:
    claims.append(("cuda_tests", "tests that skip without CUDA", not_run("cuda_tests"), "-", "all pass, 0 skipped"))

# Rows without a target: Video-LLaVA, Qwen2.5-VL, DyMU, the other selectors.
for part, name, batches in (("video_infer", "video-infer.json", (1, video_big)),
                            ("qwen_infer", "qwen-infer.json", (1, big)), ("dymu_infer", "dymu-infer.json", (1, big)),
                            ("selector_infer", "selector-infer.json", (1, big))):
    table = rows(name)
    if table is None:
        infos.append((part, "-", not_run(part)))
        continue
    for row in table:
        if row["batch_size"] in batches and row.get("path", "fast") == "fast":
            tokens = row.get("avg_visual_tokens", row.get("visual tok/layer"))
            infos.append((part, f"{row['preset']} B={row['batch_size']}",
                          f"TTFT {row['ttft_s']:.4g} s, prefill x{row['prefill_speedup_vs_none']:.3g}, decode "
                          f"{row['decode_tokens_per_s']:.4g} tok/s (x{row['decode_speedup_vs_none']:.3g}), "
                          f"{tokens:.4g} visual tok/layer"))

# The server under load (rows without a target).
serve = rows("serve-load.json")
if serve is None:
    infos.append(("serve_load", "-", not_run("serve_load")))
for row in serve or []:
    def ms(key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.4g}"
    infos.append(("serve_load", f"{row['preset']} concurrency {row['concurrency']}",
                  f"{row['succeeded']}/{row['requests']} ok, {row['requests_per_s'] or 0:.4g} req/s, "
                  f"{row['output_tokens_per_s'] or 0:.4g} out tok/s, "
                  f"TTFT p50/p99 {ms('ttft_p50_ms')}/{ms('ttft_p99_ms')} ms, "
                  f"ITL p50/p99 {ms('itl_p50_ms')}/{ms('itl_p99_ms')} ms, "
                  f"mean batch {row['mean_batch_size'] or 0:.3g}"))

lines = ["# GPU check" + (" (SMOKE: tiny shapes on the CPU; the numbers mean nothing)" if smoke else ""), ""]
lines += [(out / "env.txt").read_text().strip().replace("\n", "  \n"), ""]
passed = sum(status.startswith("PASS") for _, _, status, _, _ in claims)
lines += [f"{passed} of {len(claims)} claims pass.", ""]
lines += ["| claim | | status | measured | target |", "|---|---|---|---|---|"]
lines += [f"| {key} | {text} | {status} | {measured} | {target} |" for key, text, status, measured, target in claims]
lines += ["", "Rows without a target (fast decode path; serve_load: the engine's own path):", "", "| part | row | measured |", "|---|---|---|"]
lines += [f"| {part} | {row} | {measured} |" for part, row, measured in infos]
lines += ["", "Seconds per part: timings.tsv; logs: logs/PART.log; rows: *-infer.json, train-padded.json, "
          "train-ragged.json, serve-load.json (and their .md tables)."]
(out / "summary.md").write_text("\n".join(lines) + "\n")
PY
printf 'summary\tok\t%d\t-\tsummary.md\n' $((SECONDS - SUMMARY_BEGAN)) >> "$TIMINGS"
note "done in $((SECONDS - STARTED)) s"
cat "$OUT_DIR/summary.md"
cat "$TIMINGS"
