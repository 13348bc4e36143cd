#!/usr/bin/env bash
# launch/stress_exit.sh [N]
#
# Runs a short 2-rank ZeRO-3 training (gloo on this machine's CPU, DeepSpeed's launcher, a tiny random-init
# BERT and a tiny CSV built in a temporary directory) N times (default 20) and counts the runs that did not exit 0.
# A run that trained fine must exit 0 every time: a cluster scheduler marks anything else failed.
# Prints one line per run and a final "N runs, F non-zero exits"; exits 1 if F > 0.
#
# Environment: PYTHON (python of the environment holding unipt_scale; default: python3 on PATH), STEPS (4),
# KEEP (a directory to keep the runs' outputs and logs in; default: a temporary one, removed at the end).
set -euo pipefail
[[ "${1:-}" != -h && "${1:-}" != --help ]] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
N=${1:-20}
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "stress_exit.sh: N must be a positive integer, got '$N'" >&2; exit 2; }
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-4}
"$PYTHON" -c "import unipt_scale, deepspeed" 2>/dev/null || {
    echo "stress_exit.sh: $PYTHON cannot import unipt_scale and deepspeed; set PYTHON to the environment's python" >&2
    exit 2
}
WORK=${KEEP:-$(mktemp -d)}
mkdir -p "$WORK"
[[ -n "${KEEP:-}" ]] || trap 'rm -rf "$WORK"' EXIT

export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/unipt_scale/torch_extensions}

"$PYTHON" - "$WORK" <<'PY'
import csv, json, os, random, sys
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

root = sys.argv[1]
words = "good bad great awful happy sad love hate fine okay movie food the a is was very not day night".split()
model = os.path.join(root, "tiny-bert")
if not os.path.isdir(model):
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(model)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(model)
rng = random.Random(0)
with open(os.path.join(root, "data.csv"), "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["text", "label"])
    for i in range(160):
        w.writerow([" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))), ("pos", "neg")[i % 2]])
with open(os.path.join(root, "zero3.json"), "w") as fh:
    json.dump({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}, fh)
PY

FREE_PORT='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
failures=0
for i in $(seq 1 "$N"); do
    out="$WORK/run$i"
    start=$(date +%s)
    set +e
    "$PYTHON" -m deepspeed.launcher.runner --num_gpus 2 --master_addr 127.0.0.1 \
        --master_port "$("$PYTHON" -c "$FREE_PORT")" --module unipt_scale.cli train --output-dir "$out" \
        "backbone.path=$WORK/tiny-bert" data.source=csv "data.path=$WORK/data.csv" data.batch_size=4 \
        "train.max_steps=$STEPS" train.log_every=1 unipt.mapping_dim=8 train.tensorboard=false \
        train.checkpoint_every=2 deepspeed.enabled=true "deepspeed.config=$WORK/zero3.json" >"$out.log" 2>&1
    rc=$?
    set -e
    [[ $rc -eq 0 && -f "$out/metrics.json" ]] || failures=$((failures + 1))
    echo "run $i: exit $rc, $(( $(date +%s) - start )) s$([[ $rc -eq 0 ]] || echo "  (log: $out.log)")"
    [[ $rc -eq 0 || -n "${KEEP:-}" ]] || tail -n 20 "$out.log" >&2
done
echo "$N runs, $failures non-zero exits"
[[ $failures -eq 0 ]]
