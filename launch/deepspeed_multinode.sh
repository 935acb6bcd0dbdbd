#!/usr/bin/env bash
# Multi-node DeepSpeed ZeRO with the `deepspeed` launcher and a hostfile. Run it once, on the
# first host; the launcher starts every rank over passwordless ssh (pdsh if installed):
#
#   HOSTFILE=launch/hostfile.example DS_CONFIG=configs/deepspeed/zero2_bf16.json \
#     bash launch/deepspeed_multinode.sh --config configs/c4/llama_1b_am_adamw_nowarmup.yaml train.precision=bf16
#
# The hostfile lists "hostname slots=N" per node. Without HOSTFILE it runs on this machine only
# (NUM_GPUS ranks; on CPU they use gloo). Batch sizes, gradient accumulation, clipping and bf16
# come from the trainer config ("auto" in configs/deepspeed/*.json); a JSON value that disagrees
# is an error naming both keys. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DS_CONFIG:=configs/deepspeed/zero2_bf16.json}" "${MASTER_PORT:=29500}"
args=(--master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  : "${MASTER_ADDR:=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}"
  args+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
  [[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
else
  : "${NUM_GPUS:=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
  args+=(--num_gpus "$NUM_GPUS")
fi
exec deepspeed "${args[@]}" train.py "$@" parallel.backend=deepspeed parallel.deepspeed_config="$DS_CONFIG"
