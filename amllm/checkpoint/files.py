"""A checkpoint's files: the error types, torch files and per-rank RNG streams.

Loading uses ``torch.load(weights_only=True)``: amllm's own files (trainer.pt, model.pt, optimizer.pt,
rng-rank<r>.pt, DeepSpeed's am_layout_rank<r>.pt) hold only tensors and plain Python containers, never
pickled objects. The one exception is DeepSpeed's own per-rank optimizer files, which DeepSpeed pickles
itself (``parallel/zero_adapter.read_zero_full`` opens them with ``weights_only=False``, as DeepSpeed's
loader does; docs/deepspeed_notes.md).
"""

from __future__ import annotations

from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, directory gone); the previous checkpoint is untouched."""


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def save_rng(tmp: Path, rank: int, device: torch.device) -> None:
    """This rank's RNG states (CPU, and its CUDA device) as ``rng-rank<r>.pt``: every rank writes its own."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    save_torch(state, Path(tmp) / f"rng-rank{rank}.pt")


def restore_rng(ckpt: Path, rank: int, device: torch.device, trainer_state: dict) -> None:
    """Restore what :func:`save_rng` wrote for this rank. A rank the checkpoint had no file for (it was
    saved on fewer ranks, or before per-rank files existed) takes rank 0's states from trainer.pt."""
    f = Path(ckpt) / f"rng-rank{rank}.pt"
    state = load_torch(f) if f.is_file() else {"cpu": trainer_state["rng_cpu"], "cuda": trainer_state.get("rng_cuda")}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_torch(path: Path, map_location="cpu"):
    """torch.load restricted to tensors and plain containers (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete, use an earlier step-N/")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"the file is corrupt, use an earlier step-N/") from None
