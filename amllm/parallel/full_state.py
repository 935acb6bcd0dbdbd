"""Any amllm checkpoint as whole per-parameter state, in one process, whatever backend and world size wrote
it: the cross-backend path of a resume (amllm/checkpointer.py) and the reader of tools that need the
weights (HF export, evaluation). Each layout is read next to the code that writes it: model.pt/optimizer.pt
here, DCP by fsdp.read_dcp_full, DeepSpeed's files by zero_adapter.read_zero_full (lazily imported)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_torch, optimizer_by_name


def read_full(step_dir: Path, names: list[list[str]] | None = None, with_optimizer: bool = True,
              allow: tuple | list = ()) -> dict:
    """Any amllm checkpoint as whole tensors per parameter, in one process, whatever backend and world
    size wrote it: ``{"model": {fqn: tensor}, "optim": FQN-keyed optimizer state with "am_state", or
    None}``. ``names``: the parameter names per param group, for model.pt/optimizer.pt (index-keyed).
    A damaged optimizer file with ``allow`` containing "optimizer" gives the weights alone."""
    step_dir = Path(step_dir)
    what = f"{step_dir}: no model.pt, dcp/ or deepspeed/ inside; not an amllm checkpoint"
    try:
        if (step_dir / "model.pt").is_file():
            full = {"model": load_torch(step_dir / "model.pt"), "optim": None}
            if with_optimizer:
                try:
                    full["optim"] = optimizer_by_name(load_torch(step_dir / "optimizer.pt"), names)
                except CheckpointError as e:
                    if "optimizer" not in allow:
                        raise
                    warnings.warn(f"{e}; the optimizer state starts fresh (checkpoint.allow_changes=[optimizer])",
                                  stacklevel=2)
            return full
        if (step_dir / "dcp").is_dir():
            from .fsdp import read_dcp_full

            what = f"{step_dir / 'dcp'}: cannot be read"
            full = read_dcp_full(step_dir / "dcp")
        elif (step_dir / "deepspeed").is_dir():
            from .zero_adapter import read_zero_full

            what = f"{step_dir / 'deepspeed'}: cannot be read"
            full = read_zero_full(step_dir, tag="deepspeed", with_optimizer=with_optimizer)
        else:
            raise CheckpointError(what)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{what} ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    if not with_optimizer:
        full["optim"] = None
    return full


def full_model_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of a checkpoint, in one process, whatever backend wrote it."""
    return {k: v.contiguous() for k, v in read_full(step_dir, with_optimizer=False)["model"].items()}
