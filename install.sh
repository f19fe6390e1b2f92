#!/usr/bin/env bash
# Install workbench with its dependencies into the current Python environment (and Debian's chromium where it
# can, for the browser test), then prepare the default model (SmolLM2-135M-Instruct) in the model cache
# ($WORKBENCH_HOME, default ~/.cache/workbench).
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

# Chromium from the system's packages, for tests/test_browser.py (the notebooks in JupyterLab in a real browser,
# driven by the dev extra's playwright; never `playwright install`). Only with apt-get, as root or with sudo that
# asks no password; without it the install goes on, that test skips and tests/test_notebooks.py runs the notebooks.
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
    if command -v apt-get >/dev/null && [ "$SUDO" != none ]; then
        apt() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq "$@" >/dev/null 2>&1; }
        apt install -y --no-install-recommends chromium \
            || { apt update && apt install -y --no-install-recommends chromium; } || true
    fi
    command -v chromium >/dev/null \
        || echo "install.sh: no Chromium (installing it needs apt-get and root or sudo): tests/test_browser.py will skip"
fi
"$PY" -m workbench fetch smollm2-135m
