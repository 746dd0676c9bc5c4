#!/usr/bin/env bash
# Run the whole suite at the declared lower bounds (constraints/lowest.txt) in a fresh venv.
# Usage: bash scripts/deps/test_lowest.sh [pytest args]   (venv: $LOWEST_VENV, default .venv-lowest)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${LOWEST_VENV:-.venv-lowest}
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip install -q -c constraints/lowest.txt torch
pip install -q -c constraints/lowest.txt -e ".[dev,video,lmms]"
pip install -q --no-deps -c constraints/lowest.txt lmms-eval
pip freeze | grep -iE '^(torch|transformers|accelerate|deepspeed|peft|tokenizers|safetensors|wandb)=='
python -m pytest -q "$@"
