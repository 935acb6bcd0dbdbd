#!/usr/bin/env bash
# Multi-node DDP / FSDP2 with torchrun. Run the same command on every node:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 \
#     bash launch/torchrun_multinode.sh --config configs/c4/llama_60m_am_adamw_nowarmup.yaml
#
# (NODE_RANK=1 on the second node.) Extra arguments go to train.py, e.g. parallel.backend=fsdp2.
# `--dry-run` first prints the command instead. On one machine, two agents on 127.0.0.1 emulate
# two nodes (that is how the tests run it). data.data_dir and run_dir must be on a filesystem every
# node sees (README, "Launching").
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_common.sh
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
# Restarts: 0 by default. torchrun's --max-restarts restarts this node's workers when one dies, but
# across nodes each agent counts restarts on its own, and a restarted process group can read the
# dead attempt's addresses from torchrun's store (see _restart_store in amllm/distributed.py):
# restart multi-node jobs at the job level instead (resubmit / SLURM --requeue; train.py resumes
# from the last checkpoint). MAX_RESTARTS=N opts back in, e.g. on a single node.
: "${MAX_RESTARTS:=0}"
# A SIGTERM to this agent (pre-emption) reaches the workers, which finish the step, checkpoint and
# exit 75; torchrun SIGKILLs them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (its default, 30 s, is
# too short for a 1B checkpoint; see launch/slurm.sbatch for the 300). a torch without it ignores the variable.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
need_int NNODES "$NNODES" 1
need_int NODE_RANK "$NODE_RANK"
[[ "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES (nodes count from 0)"
need_int MAX_RESTARTS "$MAX_RESTARTS"
: "${NPROC_PER_NODE:=$(gpus_here)}"
need_int NPROC_PER_NODE "$NPROC_PER_NODE" 1
[[ -n "$DRY_RUN" ]] && echo "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
launch torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts "$MAX_RESTARTS" \
  train.py "${ARGS[@]}"
