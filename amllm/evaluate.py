"""Validation loss over a fixed token budget: token-weighted, summed over all ranks.

The validation windows are the first `eval.tokens // seq_len` windows of the validation split,
the same at every evaluation, spread over the ranks so that each window is scored exactly once
whatever the world size. Each rank sums per-token losses and counts tokens in float64; one
all-reduce of [sum, count] gives the global mean, so the result does not depend on how the
windows were split (up to float64 summation order, far below float32 resolution).

Sharded models (FSDP2, ZeRO-3) gather parameters inside every forward, which is a collective:
ranks holding fewer windows run zero-weight forwards on a dummy batch so that every rank makes
the same number of forward calls.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

from .model import lm_loss
from .distributed import is_dist


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
             lockstep: bool = False) -> dict[str, float]:
    """Mean next-token loss over this rank's `batches` and every other rank's.

    batches: (x, y) LongTensor pairs of shape (b, seq_len). lockstep: pad every rank to the same
    number of forward calls (needed when the forward itself is collective: FSDP2, ZeRO-3).
    """
    was_training = model.training
    model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    n_calls = len(batches)
    if lockstep and is_dist():
        import torch.distributed as dist

        n = torch.tensor([n_calls], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        n_calls = int(n.item())
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    for i in range(n_calls):
        if i < len(batches):
            x, y = batches[i]
            weight = 1.0
        else:  # a dummy forward that keeps collective forwards in step; contributes nothing. It has a real
            # batch's shape: a new shape would make compiled blocks compile again
            x = y = torch.zeros_like(batches[0][0]) if batches else torch.zeros(1, 1, dtype=torch.long)
            weight = 0.0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with ctx:
            logits = model(input_ids=x).logits
        if weight:
            stats[0] += lm_loss(logits, y, reduction="sum").double()
            stats[1] += y.numel()
    if is_dist():
        import torch.distributed as dist

        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    if was_training:
        model.train()
    total, count = stats.tolist()
    if count == 0:
        raise ValueError("evaluation saw no tokens; raise eval.tokens or check the validation split")
    mean = total / count
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), "val_tokens": int(count)}
