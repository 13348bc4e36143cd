#!/usr/bin/env bash
# launch/local_cpu.sh OUTPUT_DIR [DS_CONFIG] [KEY=VALUE ...]
#
# A short run of the offline demo (MiniLM + tweets) on 2 CPU ranks of this machine through DeepSpeed's launcher
# (gloo, ZeRO-3 by default: launch/ds_zero3.json). It checks a config end to end before a cluster run: the same
# entry point, the same engine, the same checkpoints, only smaller. Extra KEY=VALUE overrides go to the trainer
# (e.g. backbone.path=/models/small train.lr=1e-3).
#
# Environment: PYTHON (python of the environment holding unipt_scale; default: python3 on PATH),
# CONFIG (a run config YAML instead of the demo), NPROC (ranks, 2), STEPS (optimizer steps, 120),
# BATCH (micro batch per rank, 16), MASTER_PORT (default: a free port on 127.0.0.1),
# TORCH_EXTENSIONS_DIR (where DeepSpeed caches the CPU ops it compiles on first use).
set -euo pipefail

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}
[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || usage 2

OUT=$1
shift
DS_CONFIG=launch/ds_zero3.json
if [[ $# -ge 1 && "$1" != *=* ]]; then
    DS_CONFIG=$1
    shift
fi

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-2}
STEPS=${STEPS:-120}
BATCH=${BATCH:-16}
[[ -f "$DS_CONFIG" ]] || { echo "local_cpu.sh: DeepSpeed config $DS_CONFIG not found" >&2; exit 2; }
"$PYTHON" -c "import unipt_scale, deepspeed" 2>/dev/null || {
    echo "local_cpu.sh: $PYTHON cannot import unipt_scale and deepspeed; set PYTHON to the environment's python" >&2
    exit 2
}

export DS_ACCELERATOR=cpu                # the CPU rehearsal, even on a machine with GPUs
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # ranks share the cores
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/unipt_scale/torch_extensions}
FREE_PORT='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c "$FREE_PORT")}

OVERRIDES=(
    deepspeed.enabled=true
    "deepspeed.config=$DS_CONFIG"
    "train.max_steps=$STEPS"
    "data.batch_size=$BATCH"
    "data.limit_train=$((STEPS * BATCH * NPROC))"
    data.limit_eval=512
    data.eval_batch_size=64
    train.log_every=5
    train.tensorboard=false
)

start=$(date +%s)
set -x
"$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
    --module unipt_scale.cli train ${CONFIG:+--config "$CONFIG"} --output-dir "$OUT" "${OVERRIDES[@]}" "$@"
{ set +x; } 2>/dev/null
elapsed=$(( $(date +%s) - start ))

"$PYTHON" - "$OUT/metrics.json" "$elapsed" <<'EOF'
import json, sys

m = json.load(open(sys.argv[1]))
test = m.get("test") or {}
loss = m["train_loss"]
print(f"world_size {m['world_size']}  zero_stage {m['zero_stage']}  steps {m['steps']}  "
      f"train_loss {loss[0][1]:.4f} (step {loss[0][0]}) -> {loss[-1][1]:.4f} (step {loss[-1][0]})")
if "accuracy" in test:
    print(f"test accuracy {test['accuracy']:.4f} on {test['num_samples']} samples "
          f"(majority-class rate {test['majority_rate']:.4f})")
print(f"wall time {sys.argv[2]} s (training process {m['wall_time_s']:.0f} s); metrics in {sys.argv[1]}")
EOF
