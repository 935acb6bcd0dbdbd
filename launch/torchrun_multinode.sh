#!/usr/bin/env bash
# Multi-node DDP / FSDP2 with torchrun. Run the same command on every node:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 \
#     bash launch/torchrun_multinode.sh --config configs/c4/llama_60m_am_adamw_nowarmup.yaml
#
# (NODE_RANK=1 on the second node.) Extra arguments go to train.py, e.g. parallel.backend=fsdp2.
# On one machine, two agents on 127.0.0.1 emulate two nodes (that is how the tests run it).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
: "${NPROC_PER_NODE:=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
: "${MAX_RESTARTS:=3}"   # a rank that dies restarts the group; train.py resumes from the last checkpoint
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts "$MAX_RESTARTS" \
  train.py "$@"
