#!/usr/bin/env bash
# Multi-node UniPT training with the DeepSpeed launcher, started once on the first host of HOSTFILE; the
# launcher reaches the other hosts through pdsh over passwordless ssh.
#
# usage: launch/deepspeed_multinode.sh OUTPUT_DIR [DS_CONFIG.json] [key=value ...]
#
# Environment (defaults in brackets):
#   HOSTFILE       DeepSpeed hostfile, "host slots=N" per line             [launch/hostfile]
#   NUM_NODES      nodes to use                                            [hosts listed in HOSTFILE]
#   GPUS_PER_NODE  ranks per node                                          [8]
#   MASTER_ADDR    address of rank 0, reachable from every node            [first host in HOSTFILE]
#   MASTER_PORT    rendezvous port on MASTER_ADDR                          [29500]
#   CONFIG         run config (YAML)                   [launch/configs/llama2-70b-unipt.yaml]
#   DS_CONFIG      DeepSpeed JSON; overrides the run config's deepspeed.config   [the run config's]
#   PYTHON_ENV     file the launcher sources on every node (e.g. a venv's bin/activate)   [none]
#   GRID           a sweep instead of one run: KEY=V1,V2,... items, space-separated, each a --grid of
#                  `unipt sweep` (every variant on one frozen forward per rank and batch; ZeRO 0-2)   [none]
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTPUT_DIR=$1
shift
if [[ $# -ge 1 && $1 == *.json ]]; then
  DS_CONFIG=$1
  shift
fi

HOSTFILE=${HOSTFILE:-launch/hostfile}
if [[ ! -f $HOSTFILE ]]; then
  echo "deepspeed_multinode.sh: no hostfile at $HOSTFILE; copy launch/hostfile.example to launch/hostfile and list your nodes, or set HOSTFILE=PATH" >&2
  exit 2
fi
hosts=$(grep -vE '^[[:space:]]*(#|$)' "$HOSTFILE" | awk '{print $1}')
NUM_NODES=${NUM_NODES:-$(printf '%s\n' "$hosts" | grep -c .)}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-$(printf '%s\n' "$hosts" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-launch/configs/llama2-70b-unipt.yaml}
DS_CONFIG=${DS_CONFIG:-}

for f in "$CONFIG" ${DS_CONFIG:+"$DS_CONFIG"}; do
  [[ -f $f ]] || { echo "deepspeed_multinode.sh: $f does not exist (paths are relative to the repository root)" >&2; exit 2; }
done
[[ -n $MASTER_ADDR ]] || { echo "deepspeed_multinode.sh: $HOSTFILE lists no host; set MASTER_ADDR or fill the hostfile" >&2; exit 2; }

cmd=(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n ${PYTHON_ENV:-} ]]; then
  cmd+=(--venv_script "$PYTHON_ENV")
fi
# --module runs `python -m unipt_scale.cli --local_rank=N train ...` on every rank; the CLI accepts --local_rank.
if [[ -n ${GRID:-} ]]; then
  cmd+=(--module unipt_scale.cli sweep --config "$CONFIG" --output-dir "$OUTPUT_DIR")
  for item in $GRID; do
    cmd+=(--grid "$item")
  done
  cmd+=(deepspeed.enabled=true)
else
  cmd+=(--module unipt_scale.cli train --config "$CONFIG" --output-dir "$OUTPUT_DIR" deepspeed.enabled=true)
fi
if [[ -n $DS_CONFIG ]]; then
  cmd+=("deepspeed.config=$DS_CONFIG")
fi
cmd+=("$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
command -v deepspeed >/dev/null || { echo "deepspeed_multinode.sh: the deepspeed launcher is not on PATH; activate the environment that has unipt_scale installed" >&2; exit 2; }
exec "${cmd[@]}"
