"""The interface train.py and the Checkpointer call: one backend per way of distributing a step.

    backend = make_backend(cfg, info)                # ddp.py | fsdp.py | deepspeed_backend.py, imported lazily
    backend.setup(model)                             # AC + compile (blocks.py), wrap, build the optimizer
    for each micro-batch i:
        with backend.micro_step(last), backend.autocast():     # gradient sync on the last micro-batch only
            loss = backend.model(input_ids=x, targets=y)       # LlamaLM: the loss, chunked
        backend.backward(loss, accum)
    backend.optimizer_step(loss_sum, guard, stop)    # clip, guard, update, zero grads -- no host read
    backend.grad_norm()                              # the step's pre-clip norm (one host read; logged steps)
    backend.write(tmp) / backend.read(path, load_optimizer)    # native files (amllm/checkpointer.py decides)
    backend.load_full(model_sd, optim_sd)            # whole per-parameter state: another backend's checkpoint

The backend owns the whole optimizer step, so no caller needs to know that DeepSpeed clips and
measures the norm inside its own step. A step makes no host read (see guard.NonFiniteGuard).

| backend   | file              | model                      | AM statistics                          | checkpoint files        |
|-----------|-------------------|----------------------------|----------------------------------------|-------------------------|
| ddp       | ddp.py            | DDP (or plain, 1 process)  | no reduction: every rank has full grads | model.pt, optimizer.pt  |
| fsdp2     | fsdp.py           | fully_shard per block+root | all-reduced over the DTensor mesh      | dcp/ (reshards N -> M)  |
| deepspeed | deepspeed_backend | DeepSpeed engine, ZeRO 0-3 | one all-reduce, deferred to the last   | deepspeed/ (+AM layout) |
|           | .py               |                            | per-group call (zero_adapter.py)       |                         |

Any checkpoint resumes on any backend and world size: natively where the files allow it (the last
column), otherwise whole per parameter (parallel/full_state.py) through :meth:`Backend.load_full`.

The model and the optimizer never import a backend: only this package does.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import math
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch

from ..config import Config
from ..distributed import DistInfo
from ..guard import NonFiniteGuard, takes_found_inf

#: What :meth:`Backend.read` hands the optimizer state to: the Checkpointer's loader (it checks the
#: hyper-parameters first), called with the state dict or a zero-argument function that reads it.
LoadOptimizer = Callable[[object], None]


class Backend(abc.ABC):
    """One way of distributing the training step. Attributes set by :meth:`setup`:

    ``model``: what the forward runs through (DDP wrapper, FSDP2 module, DeepSpeed engine);
    ``raw_model``: the LlamaLM with its own parameter names (checkpoints, export);
    ``optimizer``: the optimizer that holds the lr of each group and, for AM optimizers, ``last_beta``.
    """

    name: str
    lockstep_eval: bool = False  # True when a forward is itself collective (sharded parameters)

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.model: Optional[torch.nn.Module] = None
        self.raw_model: Optional[torch.nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._names: Optional[list[list[str]]] = None  # parameter names per optimizer group, taken at set-up

    # -- set-up --------------------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, model: torch.nn.Module) -> None:
        """Activation checkpointing and compile (parallel/blocks.py), wrapping, the optimizer."""

    def autocast(self) -> ContextManager:
        """The context of a forward: bf16 autocast where the backend does not cast by itself."""
        return contextlib.nullcontext()

    # -- one step ------------------------------------------------------------------------------
    def micro_step(self, last: bool) -> ContextManager:
        """The context of one micro-batch's forward and backward; gradients are synced on the last."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        (loss / accum).backward()

    @abc.abstractmethod
    def optimizer_step(self, loss_sum: torch.Tensor, guard: NonFiniteGuard, stop: bool = False) -> None:
        """The whole optimizer step: global-norm clipping, the non-finite guard's flags (one all-reduce),
        the update (skipped on the device when flags or AM statistics are non-finite), zeroed grads."""

    @abc.abstractmethod
    def grad_norm(self) -> float:
        """The last step's pre-clip global gradient norm, for logging (one host read)."""

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- checkpoints (amllm/checkpointer.py decides what to call) --------------------------------
    @property
    def layout(self) -> str:
        """What this backend's native checkpoint files are; saved in meta.json as ``layout``."""
        return self.name

    @abc.abstractmethod
    def reads_natively(self, meta: dict, world_size: int) -> bool:
        """Whether :meth:`read` loads a checkpoint saved with ``meta`` on this world size. Otherwise the
        Checkpointer reads it whole per parameter and calls :meth:`load_full`."""

    def state_for_check(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts to check for non-finite values before a save; sharded backends
        check the (replicated) norm and loss instead."""
        return {}, {}

    @abc.abstractmethod
    def write(self, tmp: Path, model_state: Optional[dict] = None, optim_state: Optional[dict] = None) -> None:
        """Write the native files into ``tmp`` (every rank calls it). ``model_state`` / ``optim_state``: what
        :meth:`state_for_check` returned, so it is not computed twice."""

    @abc.abstractmethod
    def read(self, path: Path, load_optimizer: Optional[LoadOptimizer]) -> None:
        """Load the native files of ``path``: the model, and the optimizer state through ``load_optimizer``
        -- or, when it is None (``checkpoint.allow_changes=[optimizer]`` with another optimizer), the
        weights alone, the optimizer starting fresh."""

    @abc.abstractmethod
    def load_full(self, model: dict, optim: Optional[dict]) -> None:
        """Load whole per-parameter state (parallel/full_state.py: any backend's checkpoint, any world size):
        ``model`` fqn -> tensor; ``optim`` FQN-keyed optimizer state dict, or None (weights only)."""

    def param_names(self) -> list[list[str]]:
        """The fully qualified parameter names of each optimizer param group, in the group's order:
        what maps index-keyed optimizer state (optimizer.pt) to parameters. Taken at set-up
        (:meth:`_take_names`), from the optimizer as built over the model's own parameters: FSDP2 registers
        other (unsharded) parameter objects while a block stays gathered after a forward, and DeepSpeed
        rewrites the client optimizer's groups to its flat shards."""
        return self._names

    def _take_names(self, optimizer: torch.optim.Optimizer) -> None:
        names = {id(p): n for n, p in self.raw_model.named_parameters()}
        self._names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def guarded_step(optimizer, guard: NonFiniteGuard, flags: torch.Tensor, step=None) -> None:
    """``step()`` (default ``optimizer.step``) unless the guard's flags say skip, decided on the device
    where the optimizer can (``found_inf``); then tell the guard what happened.

    AM optimizers also get ``skip_nonfinite``: their statistics are all-reduced anyway, and a NaN/inf
    gradient on any rank makes them non-finite on every rank, so the skip needs no extra collective."""
    step = step or optimizer.step
    found = guard.found_inf(flags)
    if takes_found_inf(optimizer):
        optimizer.found_inf = found
        if hasattr(optimizer, "skip_nonfinite"):
            optimizer.skip_nonfinite = True
        step()
        skipped = optimizer.last_skipped if hasattr(optimizer, "last_skipped") else found
    elif guard.needs_host_decision(optimizer):  # skip mode, an optimizer that cannot skip by itself
        skipped = found
        if not bool(found):  # the one host read of such a step (docs/faults.md)
            step()
    else:  # stop mode: the step goes ahead; the next check stops the run before anything is saved
        step()
        skipped = torch.zeros_like(found)
    guard.record(flags, skipped)


def clip_and_step(backend: Backend, loss_sum: torch.Tensor, guard: NonFiniteGuard, stop: bool) -> torch.Tensor:
    """Global-norm clipping (optim.grad_clip; 0: measure only), the guard, the update, zeroed gradients:
    the optimizer step of the backends whose gradients are ordinary (DTensor) tensors. Returns the
    pre-clip norm (a device tensor; a DTensor's global value under FSDP2)."""
    max_norm = backend.cfg.optim.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(backend.raw_model.parameters(), max_norm if max_norm > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    guarded_step(backend.optimizer, guard, guard.observe(loss_sum, norm, stop))
    backend.optimizer.zero_grad(set_to_none=True)
    return norm


#: parallel.backend -> (module in this package, class): imported when chosen, so a run that does not use
#: DeepSpeed never imports it.
BACKENDS = {"ddp": ("ddp", "DDPBackend"), "fsdp2": ("fsdp", "FSDP2Backend"),
            "deepspeed": ("deepspeed_backend", "DeepSpeedBackend")}


def make_backend(cfg: Config, info: DistInfo) -> Backend:
    module, cls = BACKENDS[cfg.parallel.backend]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)(cfg, info)
