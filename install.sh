#!/usr/bin/env bash
# Install workbench with its dependencies into the current Python environment, then prepare the
# default model (SmolLM2-135M-Instruct) in the model cache ($WORKBENCH_HOME, default ~/.cache/workbench).
#
#   bash install.sh            # PYTHON=/path/to/python bash install.sh to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# torch first, pinned, when none is installed: an unpinned resolve pulls the newest CUDA build
# (several GB). On a machine whose pip has only the CPU wheel at hand (CI), this takes that one;
# a GPU machine that already has torch >= 2.11 keeps its own.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
"$PY" -m workbench fetch smollm2-135m
