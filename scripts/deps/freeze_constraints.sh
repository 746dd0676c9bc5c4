#!/usr/bin/env bash
# Write constraints/tested.txt from the active virtual environment (after the suite passed in it).
# Usage: . .venv/bin/activate && bash scripts/deps/freeze_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python_version=$(python -c 'import platform; print(platform.python_version())')
{
    echo "# The exact set the README's commands and .ci/run install (pip install -c constraints/tested.txt ...)."
    echo "# Resolved on Python ${python_version}, $(uname -m), $(date -u +%F). To move to newer releases: raise the"
    echo "# bounds in pyproject.toml, install into a fresh venv without -c, run the suite, then regenerate this"
    echo "# file with scripts/deps/freeze_constraints.sh and update the README's tested set."
    # A local version label (+cpu, +cu130) would stop GPU nodes from matching the CPU build's pin.
    pip freeze --exclude-editable | grep -v '^duet-vlm' | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/'
} > constraints/tested.txt
echo "wrote constraints/tested.txt ($(grep -vc '^#' constraints/tested.txt) packages)"
