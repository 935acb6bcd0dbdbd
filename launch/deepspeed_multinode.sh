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
# is an error naming both keys. Extra arguments go to train.py; `--dry-run` first prints the
# command instead. data.data_dir and run_dir must be on a filesystem every host sees.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_common.sh
: "${DS_CONFIG:=configs/deepspeed/zero2_bf16.json}" "${MASTER_PORT:=29500}"
[[ -f "$DS_CONFIG" ]] || die "DS_CONFIG=$DS_CONFIG not found; pick one of configs/deepspeed/*.json"
args=(--master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE not found; see launch/hostfile.example"
  : "${MASTER_ADDR:=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}"
  [[ -n "$MASTER_ADDR" ]] || die "HOSTFILE=$HOSTFILE lists no host; one 'hostname slots=N' per line"
  args+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
  if [[ -n "${NUM_NODES:-}" ]]; then need_int NUM_NODES "$NUM_NODES" 1; args+=(--num_nodes "$NUM_NODES"); fi
else
  : "${NUM_GPUS:=$(gpus_here)}"
  need_int NUM_GPUS "$NUM_GPUS" 1
  args+=(--num_gpus "$NUM_GPUS")
fi
launch deepspeed "${args[@]}" train.py "${ARGS[@]}" parallel.backend=deepspeed parallel.deepspeed_config="$DS_CONFIG"
