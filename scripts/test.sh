#!/usr/bin/env bash
# Install into a fresh virtual environment and run the whole test suite on the CPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
bash "$root/scripts/install.sh" "$venv" test
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# DeepSpeed's JIT-built CPU ops are cached between runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/unipt_scale/torch_extensions}"
cd "$root"
exec "$venv/bin/python" -m pytest -q tests "$@"
