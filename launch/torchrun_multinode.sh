#!/usr/bin/env bash
# Multi-node UniPT training with torchrun, without ssh or a scheduler: run this same command on every node
# (in any order); the nodes meet through a c10d rendezvous at MASTER_ADDR:MASTER_PORT.
#
# usage: launch/torchrun_multinode.sh OUTPUT_DIR [DS_CONFIG.json] [key=value ...]
#
# Environment (defaults in brackets):
#   NUM_NODES      nodes taking part                                   [1]
#   GPUS_PER_NODE  ranks per node                                      [8]
#   MASTER_ADDR    a node's address every node can reach (rendezvous)  [127.0.0.1]
#   MASTER_PORT    rendezvous port                                     [29500]
#   RDZV_ID        job id shared by the nodes of one run               [unipt]
#   CONFIG         run config (YAML)               [launch/configs/llama2-70b-unipt.yaml]
#   DS_CONFIG      DeepSpeed JSON; overrides the run config's deepspeed.config   [the run config's]
#   DRY_RUN=1      print the command instead of running it
# HOSTFILE is not used: each node joins by running this script.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTPUT_DIR=$1
shift
if [[ $# -ge 1 && $1 == *.json ]]; then
  DS_CONFIG=$1
  shift
fi

NUM_NODES=${NUM_NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-unipt}
CONFIG=${CONFIG:-launch/configs/llama2-70b-unipt.yaml}
DS_CONFIG=${DS_CONFIG:-}

for f in "$CONFIG" ${DS_CONFIG:+"$DS_CONFIG"}; do
  [[ -f $f ]] || { echo "torchrun_multinode.sh: $f does not exist (paths are relative to the repository root)" >&2; exit 2; }
done

cmd=(torchrun --nnodes "$NUM_NODES" --nproc_per_node "$GPUS_PER_NODE"
     --rdzv_id "$RDZV_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
     -m unipt_scale.cli train --config "$CONFIG" --output-dir "$OUTPUT_DIR" deepspeed.enabled=true)
if [[ -n $DS_CONFIG ]]; then
  cmd+=("deepspeed.config=$DS_CONFIG")
fi
cmd+=("$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
command -v torchrun >/dev/null || { echo "torchrun_multinode.sh: torchrun is not on PATH; activate the environment that has unipt_scale installed" >&2; exit 2; }
exec "${cmd[@]}"
