"""DDP (also the plain single process): every rank holds the whole model and, after the backward's
all-reduce, the whole averaged gradient, so AM optimizers sum their statistics locally (no reduction:
a second one would count every element world-size times). Checkpoints: model.pt + optimizer.pt, whole,
so they load on any world size."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from .. import checkpoint as ckpt  # its functions by attribute: tests put a full disk in ckpt.save_torch
from ..guard import NonFiniteGuard
from ..optim_factory import build_optimizer
from .backend import Backend, LoadOptimizer, clip_and_step
from .blocks import prepare_blocks


def wrap_ddp(model: torch.nn.Module, info) -> torch.nn.Module:
    """DDP for world > 1 (one process: the model itself)."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # gradients are views into DDP's all-reduce buckets: no copy in or out of the buckets, and no
    # second gradient-sized buffer (the optimizer reads .grad in place; zero_grad(set_to_none) is fine)
    return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)


class DDPBackend(Backend):
    name = "ddp"

    def setup(self, model: torch.nn.Module) -> None:
        self.raw_model = prepare_blocks(model, self.cfg.train)  # AC, then per-block compile, then DDP
        self.model = wrap_ddp(model, self.info)
        self.optimizer = build_optimizer(self.cfg.optim, model.parameters(), self.info.device,
                                         names={p: n for n, p in model.named_parameters()},
                                         sr_seed=self.cfg.train.seed)
        self._take_names(self.optimizer)

    def autocast(self):
        """bf16 mixed precision (FSDP2 and DeepSpeed cast themselves)."""
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_step(self, last: bool):
        sync = last or not self.info.distributed
        return contextlib.nullcontext() if sync else self.model.no_sync()

    def optimizer_step(self, loss_sum: torch.Tensor, guard: NonFiniteGuard, stop: bool = False) -> None:
        self._norm = clip_and_step(self, loss_sum, guard, stop)

    def grad_norm(self) -> float:
        return self._norm.item()

    def reads_natively(self, meta: dict, world_size: int) -> bool:
        return meta.get("layout", meta.get("backend", "ddp")) == "ddp"  # whole files: any world size

    def state_for_check(self) -> tuple[dict, dict]:
        return self.raw_model.state_dict(), self.optimizer.state_dict()

    def write(self, tmp: Path, model_state: Optional[dict] = None, optim_state: Optional[dict] = None) -> None:
        if self.info.is_main:
            ckpt.save_torch(model_state if model_state is not None else self.raw_model.state_dict(), tmp / "model.pt")
            ckpt.save_torch(optim_state if optim_state is not None else self.optimizer.state_dict(), tmp / "optimizer.pt")

    def read(self, path: Path, load_optimizer: Optional[LoadOptimizer]) -> None:
        self.raw_model.load_state_dict(ckpt.load_torch(path / "model.pt", map_location=self.info.device))
        if load_optimizer is not None:
            # CPU first: the optimizer's load_state_dict moves each entry where it keeps it (torch keeps a
            # loaded `step` on whatever device it came on, and a GPU step would sync per tensor per step)
            load_optimizer(lambda: ckpt.load_torch(path / "optimizer.pt", map_location="cpu"))

    def load_full(self, model: dict, optim: Optional[dict]) -> None:
        load_weights(self.raw_model, model)
        if optim is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_by_index(optim, self.param_names()))


def load_weights(model: torch.nn.Module, full: dict) -> None:
    """``model.load_state_dict(full)`` for parameters; buffers the checkpoint lacks keep their values
    (non-persistent ones, e.g. rotary frequencies, are rebuilt from the config)."""
    missing = [n for n, _ in model.named_parameters() if n not in full]
    if missing:
        raise ckpt.CheckpointError(f"the checkpoint has no {missing[0]} (and {len(missing) - 1} more parameters); "
                              f"it was saved for another model")
    model.load_state_dict(full, strict=False)
