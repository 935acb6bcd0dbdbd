"""FSDP2 (``fully_shard``) for the trainer (:class:`FSDP2Backend`), and DCP checkpoints that reshard N ranks -> M ranks.

AM optimizers need nothing FSDP-specific: built over the sharded model's parameters (DTensors)
with ``reducer=None``, they sum their partial statistics over the local shards and all-reduce
them once over the mesh dimension the parameters are sharded on (``amllm.optim.reduce``).
FSDP2 shards every parameter evenly on dim 0 (padding is internal to FSDP and not visible in
``to_local()``), so the global β is exact.

Checkpoints use ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards, and a
run saved on N ranks loads on M ranks (FSDP2 or not), because DCP stores global tensor metadata.
The AM β state (π, last β, β step, fallback count -- replicated, identical on every rank) is
not part of torch's distributed optimizer state dict, which keeps only per-parameter state and
param groups; it is saved beside it under ``"am_state"`` and restored after the optimizer load
(which runs a zero-lr warm-up step on a fresh optimizer that would otherwise leave its β state
advanced by one step).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..distributed import ensure_process_group
from ..guard import NonFiniteGuard
from ..optim_factory import build_optimizer
from .backend import Backend, LoadOptimizer, clip_and_step
from .blocks import prepare_blocks, transformer_blocks


def mixed_precision_policy(precision: str):
    """bf16: compute in bf16 from fp32 shards, reduce gradients in fp32. fp32 / bf16_pure: none."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "bf16_pure":  # weights already bf16; still sum gradients over ranks in fp32
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def reshard_policy(policy: str | bool, n_blocks: int) -> list[bool]:
    """``reshard_after_forward`` per block for parallel.reshard_after_forward: default (torchtitan's:
    every block but the last -- FSDP would gather the last one again at once for its backward) |
    always | never; a bool means always / never."""
    if policy is True or policy == "always":
        return [True] * n_blocks
    if policy is False or policy == "never":
        return [False] * n_blocks
    if policy == "default":
        return [i < n_blocks - 1 for i in range(n_blocks)]
    raise ValueError(f"reshard_after_forward={policy!r}: choose default, always or never")


def apply_fsdp2(model: nn.Module, precision: str = "fp32", mesh=None,
                reshard_after_forward: str | bool = "default") -> nn.Module:
    """``fully_shard`` each transformer block, then the root (embeddings, final norm, lm head).

    Call after moving the model to its device (and casting it for ``bf16_pure``), after
    activation checkpointing and per-block compilation (``blocks.prepare_blocks``), and before
    building the optimizer. ``mesh``: a 1-D DeviceMesh (default: all ranks, on the model's
    device type, so CUDA/NCCL and CPU/gloo both work). ``reshard_after_forward``: see
    :func:`reshard_policy` (FSDP2 itself keeps the root's parameters gathered after forward).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        import torch.distributed as dist

        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = mixed_precision_policy(precision)
    blocks = transformer_blocks(model)
    for block, reshard in zip(blocks, reshard_policy(reshard_after_forward, len(blocks))):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward != "never"
                and reshard_after_forward is not False)
    return model


def _am_state(optimizer) -> Optional[dict]:
    return optimizer.state_dict().get("am_state") if optimizer is not None else None


def save_dcp(path: str | os.PathLike, model: nn.Module, optimizer=None, extra: Optional[dict] = None) -> None:
    """Save model, optimizer (incl. AM β state and per-group ``prev_lr``) and ``extra`` with DCP.

    Every rank must call it. ``extra``: the trainer's small JSON-serialisable state (step, sampler
    position, tokens seen); saved once. ``path`` is a directory.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        am = _am_state(optimizer)
        if am is not None:
            state["am_state"] = am
    if extra is not None:
        state["extra"] = json.dumps(extra)  # one leaf: DCP would flatten a dict into keys to know at load
    dcp.save(state, checkpoint_id=str(path))


def load_dcp(path: str | os.PathLike, model: nn.Module, optimizer=None) -> dict:
    """Load a :func:`save_dcp` checkpoint into ``model`` / ``optimizer`` on any world size.

    Returns ``extra`` (``{}`` when none was saved). ``model`` must already be wrapped the way it
    will train (``apply_fsdp2`` or not) and ``optimizer`` built over its parameters.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    has = {k.split(".", 1)[0] for k in meta}
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        if "optim" not in has:
            raise ValueError(f"{path} holds no optimizer state; load it with optimizer=None (weights only)")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        am = _am_state(optimizer)
        if am is not None and "am_state" in has:
            # fresh tensors of the right shapes, filled in place by DCP; only the keys the checkpoint has
            # (one saved before a key existed, e.g. sr_step, loads with that key's fresh value)
            state["am_state"] = {k: v for k, v in am.items() if f"am_state.{k}" in meta}
    if "extra" in has:
        state["extra"] = ""  # replaced by the saved string
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        with warnings.catch_warnings():
            if "am_state" in state:  # torch's loader drops it; restored just below, so no "older dict" note
                warnings.filterwarnings("ignore", message=r".*state dict without am_state", category=UserWarning)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if "am_state" in state:
            sd = optimizer.state_dict()
            sd["am_state"] = state["am_state"]
            optimizer.load_state_dict(sd)
    return json.loads(state["extra"]) if "extra" in state else {}


def read_dcp_full(path: str | os.PathLike) -> dict:
    """A :func:`save_dcp` checkpoint as whole tensors in one process, whatever world size wrote it:
    ``{"model": {fqn: tensor}, "optim": {"state": {fqn: {...}}, "param_groups": [...], "am_state"}}``
    (DCP stores global shapes, so its reader reassembles the shards; no process group needed)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    optim = dict(state.get("optim") or {})
    if optim:
        optim["am_state"] = state.get("am_state")
    return {"model": state["model"], "optim": optim or None}


def load_full(model: nn.Module, optimizer, full: dict) -> None:
    """Load whole per-parameter state (:func:`read_dcp_full`'s layout, from any backend) into a model
    wrapped by :func:`apply_fsdp2` (each rank keeps its shard) and its optimizer (None: weights only)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_state_dict)

    options = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(model, full["model"], options=options)
        return
    optim = {k: v for k, v in full["optim"].items() if k != "am_state"}
    with warnings.catch_warnings():  # restored just below, so no "older dict" note
        warnings.filterwarnings("ignore", message=r".*state dict without am_state", category=UserWarning)
        set_state_dict(model, optimizer, model_state_dict=full["model"], optim_state_dict=optim, options=options)
    if full["optim"].get("am_state") is not None:
        sd = optimizer.state_dict()
        sd["am_state"] = full["optim"]["am_state"]
        optimizer.load_state_dict(sd)


class FSDP2Backend(Backend):
    """``fully_shard`` per block and root; the AM optimizer all-reduces its partial sums over the DTensor
    mesh itself; DCP checkpoints that reshard N -> M."""

    name = "fsdp2"
    lockstep_eval = True

    def setup(self, model: nn.Module) -> None:
        ensure_process_group(self.info.device)  # fully_shard needs a group, also in one process
        prepare_blocks(model, self.cfg.train)  # AC, then per-block compile, then fully_shard
        self.raw_model = self.model = apply_fsdp2(model, self.cfg.train.precision,
                                                  reshard_after_forward=self.cfg.parallel.reshard_after_forward)
        self.optimizer = build_optimizer(self.cfg.optim, model.parameters(), self.info.device,
                                         names={p: n for n, p in model.named_parameters()},
                                         sr_seed=self.cfg.train.seed)
        self._take_names(self.optimizer)

    def micro_step(self, last: bool):
        # reduce-scatter gradients once per optimizer step, not once per micro-batch
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts: no autocast either

    def optimizer_step(self, loss_sum: torch.Tensor, guard: NonFiniteGuard, stop: bool = False) -> None:
        self._norm = clip_and_step(self, loss_sum, guard, stop)

    def grad_norm(self) -> float:
        return self._norm.item()

    def reads_natively(self, meta: dict, world_size: int) -> bool:
        return meta.get("layout", meta.get("backend")) == "fsdp2"  # DCP reshards N -> M itself

    def write(self, tmp: Path, model_state: Optional[dict] = None, optim_state: Optional[dict] = None) -> None:
        save_dcp(tmp / "dcp", self.model, self.optimizer)

    def read(self, path: Path, load_optimizer: Optional[LoadOptimizer]) -> None:
        # DCP loads the optimizer state in place; the hyper-parameters were checked from trainer.pt
        load_dcp(path / "dcp", self.model, self.optimizer if load_optimizer is not None else None)

    def load_full(self, model: dict, optim: Optional[dict]) -> None:
        load_full(self.model, self.optimizer if optim is not None else None, {"model": model, "optim": optim})
