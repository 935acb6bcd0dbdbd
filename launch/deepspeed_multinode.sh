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
#
# What reaches the other hosts (docs/multinode.md): DeepSpeed's pdsh runner starts every host with
# `cd <this directory>; export ...; <this python> -m deepspeed.launcher.launch ...` over ssh, so the
# repository and the virtualenv must be at the same paths there. It exports only PYTHON* / NCCL*
# variables and those in a DS_ENV_FILE; this script writes that file (.deepspeed_env.amllm here:
# HF_*, TRANSFORMERS_*, TOKENIZERS_*, TORCH_*, TRITON_*, OMP_*, MKL_*, GLOO_*, WANDB_*, AMLLM_*,
# LD_LIBRARY_PATH) and passes --venv_script so the remote shell activates the same virtualenv (PATH:
# ninja and compilers for the JIT-built kernels, VIRTUAL_ENV). The interface gloo/NCCL use is chosen
# on each host by train.py (the one that routes to MASTER_ADDR) unless GLOO_/NCCL_SOCKET_IFNAME are set.
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
  # the virtualenv of the python that runs `deepspeed` here; VENV= (empty) turns this off
  : "${VENV=$(python -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')}"
  if [[ -n "$VENV" ]]; then
    [[ -f "$VENV/bin/activate" ]] || die "VENV=$VENV has no bin/activate; set VENV to the virtualenv every host has at that path"
    args+=(--venv_script "$VENV/bin/activate")
  fi
  export DS_ENV_FILE="$PWD/.deepspeed_env.amllm"
  carried=$(carry_env)
  if [[ -n "$DRY_RUN" ]]; then echo "carried to every host: $(cut -d= -f1 <<<"$carried" | tr '\n' ' ')"
  else (umask 077 && printf '%s\n' "$carried" >"$DS_ENV_FILE"); fi
  if [[ -n "${NUM_NODES:-}" ]]; then need_int NUM_NODES "$NUM_NODES" 1; args+=(--num_nodes "$NUM_NODES"); fi
else
  : "${NUM_GPUS:=$(gpus_here)}"
  need_int NUM_GPUS "$NUM_GPUS" 1
  args+=(--num_gpus "$NUM_GPUS")
fi
launch deepspeed "${args[@]}" train.py "${ARGS[@]}" parallel.backend=deepspeed parallel.deepspeed_config="$DS_CONFIG"
