#!/usr/bin/env bash
# Download the wheels scripts/gpu/check.sh installs offline on a GPU box: run it where a package registry is
# reachable (not on the box). The box has Python 3.12 on x86_64 with torch and transformers (and their own
# dependencies: numpy, huggingface_hub, tokenizers, safetensors, PyYAML, tqdm, regex, ...) preinstalled, no
# package registry, and no deepspeed, wandb, av or matplotlib (the check needs none of them: report charts are
# skipped without matplotlib). The check installs a wheel only when its distribution is missing there.
#
# Downloaded, at the pins of constraints/tested.txt (setuptools at pyproject's build-system range), --no-deps:
#   accelerate, psutil          transformers' TrainingArguments (imported by llava.arguments) needs accelerate
#   peft                        LoRA paths (llava.model.stages, llava.training.lora)
#   pillow                      llava.data.images (imported by the model families)
#   safetensors, tokenizers, PyYAML, tqdm
#                               version-bound in pyproject.toml; fallbacks for a box without them
#   pytest, pluggy, iniconfig, Pygments
#                               the CUDA-only tests
#   setuptools                  `pip install --no-build-isolation -e .` of the project (torch brings it on 3.12)
# The project itself is not built into a wheel: the repository travels with the device tool and is installed
# editable. Total about 15 MiB (pillow 7, tokenizers 3.4); the device tool carries at most 64 MiB with the working tree.
#
#   bash scripts/gpu/prepare_wheels.sh                  # -> wheels/ (WHEEL_DIR)
#   DRY_RUN=1 bash scripts/gpu/prepare_wheels.sh        # print the packages and the pip command, download nothing
#   INCLUDE_TORCH=1 bash scripts/gpu/prepare_wheels.sh  # also torch and transformers (GBs with torch's CUDA wheels)
#   EXTRA="numpy huggingface_hub" bash scripts/gpu/prepare_wheels.sh   # more packages, at their tested pins
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

WHEEL_DIR="${WHEEL_DIR:-wheels}"
CONSTRAINTS="${CONSTRAINTS:-constraints/tested.txt}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PLATFORMS="${PLATFORMS:-manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64}"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    command -v python >/dev/null 2>&1 || PYTHON=python3
fi

PACKAGES=(accelerate psutil peft pillow safetensors tokenizers PyYAML tqdm pytest pluggy iniconfig Pygments
          starlette uvicorn click h11 anyio httpx httpcore)
if [[ "${INCLUDE_TORCH:-0}" == "1" ]]; then
    PACKAGES+=(torch transformers)
fi
read -ra EXTRA_PACKAGES <<< "${EXTRA:-}"
PACKAGES+=("${EXTRA_PACKAGES[@]}")

declare -A PINS=()  # name in lower case, _ and . as - -> NAME==VERSION of the constraints file
while IFS= read -r line; do
    if [[ "$line" =~ ^([A-Za-z0-9_.-]+)==([^[:space:]\;]+) ]]; then
        key="${BASH_REMATCH[1],,}"
        key="${key//[_.]/-}"
        PINS["$key"]="${BASH_REMATCH[1]}==${BASH_REMATCH[2]}"
    fi
done < "$CONSTRAINTS"

SPECS=()
for package in "${PACKAGES[@]}"; do
    key="${package,,}"
    key="${key//[_.]/-}"
    if [[ -z "${PINS[$key]:-}" ]]; then
        echo "error: $package is not pinned in $CONSTRAINTS" >&2
        exit 1
    fi
    SPECS+=("${PINS[$key]}")
done
# setuptools is not in the tested set (the build backend is installed by pip's build isolation): the range of
# pyproject.toml's [build-system] requires.
SETUPTOOLS="$(grep -oE '"setuptools[^"]*"' pyproject.toml | head -n 1 | tr -d '"')"
SPECS+=("${SETUPTOOLS:-setuptools}")

ABI="cp${PYTHON_VERSION/./}"
CMD=("$PYTHON" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check
    --python-version "$PYTHON_VERSION" --implementation cp --abi "$ABI" --abi abi3 --abi none)
for platform in $PLATFORMS; do
    CMD+=(--platform "$platform")
done
CMD+=(-d "$WHEEL_DIR" "${SPECS[@]}")

echo "packages (${#SPECS[@]}): ${SPECS[*]}"
echo "+ ${CMD[*]}"
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    exit 0
fi
mkdir -p "$WHEEL_DIR"
"${CMD[@]}"
ls -l "$WHEEL_DIR"
KIB="$(du -sk "$WHEEL_DIR" | cut -f1)"
echo "total: $((KIB / 1024)) MiB ($KIB KiB) in $WHEEL_DIR/"
if ((KIB > 48 * 1024)); then
    echo "warning: above 48 MiB; the device tool carries at most 64 MiB with the working tree" >&2
fi
ignored=0
git check-ignore -q "$WHEEL_DIR/x.whl" 2>/dev/null || ignored=$?
if ((ignored == 1)); then  # inside the repository and not ignored (128: outside it)
    echo "note: $WHEEL_DIR/ is not git-ignored: do not commit it (it travels to the device as an untracked folder)" >&2
fi
