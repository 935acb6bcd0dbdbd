"""The three ways train.py distributes a step, behind one small interface.

    backend = make_backend(cfg, info)
    backend.setup(model)                       # wrap (DDP / fully_shard / deepspeed.initialize), build optimizer
    for each micro-batch i:
        with backend.micro_step(last):         # gradient sync on the last micro-batch only
            loss = backend.model(input_ids=x, targets=y)   # LlamaLM: the loss, chunked
        backend.backward(loss, accum)
    grad_norm = backend.optimizer_step(loss_sum, guard, stop)   # clip, guard, update, zero grads
    backend.write(tmp_dir) / backend.read(ckpt_dir)  # native files; amllm/checkpoint.py decides
    backend.load_full(model_sd, optim_sd)       # whole per-parameter state: another backend's checkpoint

The backend owns the whole optimizer step, so no caller needs to know that DeepSpeed clips and
measures the norm inside its own step. A step makes no host read (see guard.NonFiniteGuard).

| backend   | model                      | AM statistics                          | checkpoint files        |
|-----------|----------------------------|----------------------------------------|-------------------------|
| ddp       | DDP (or plain, 1 process)  | no reduction: every rank has full grads | model.pt, optimizer.pt  |
| fsdp2     | fully_shard per block+root | all-reduced over the DTensor mesh      | dcp/ (reshards N -> M)  |
| deepspeed | DeepSpeed engine, ZeRO 0-3 | one all-reduce, deferred to the last   | deepspeed/ (+AM layout) |
|           |                            | per-group call (ZeroAMAdapter)         |                         |

Any checkpoint resumes on any backend and world size: natively where the files allow it (the last
column), otherwise whole per parameter through :meth:`Backend.load_full` (amllm/checkpoint.py).

The model and the optimizer never import a backend: only this package does.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..checkpoint import CheckpointError
from ..config import Config, ConfigError
from ..guard import NonFiniteGuard, takes_found_inf
from ..optim_factory import build_optimizer
from .blocks import prepare_blocks
from .distributed import DistInfo, ensure_process_group, wrap_ddp


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a clip norm under FSDP2), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Backend:
    name = "ddp"
    lockstep_eval = False  # True when a forward is itself collective (sharded parameters)

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.model = self.raw_model = self.optimizer = None
        self._names: list[list[str]] | None = None  # parameter names per optimizer group, taken at set-up

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module) -> None:
        self.raw_model = prepare_blocks(model, self.cfg.train)  # AC, then per-block compile, then DDP
        self.model = wrap_ddp(model, self.info)
        # DDP hands every rank the full averaged gradient: AM statistics need no reduction.
        self.optimizer = build_optimizer(self.cfg.optim, model.parameters(), self.info.device)
        self.param_names()

    def autocast(self):
        """bf16 mixed precision for the plain/DDP path (FSDP2 and DeepSpeed cast themselves)."""
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def am_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that holds lr per group and, for AM, `last_beta` / `fallback_count`."""
        return self.optimizer

    # -- one step -----------------------------------------------------------------------------
    def micro_step(self, last: bool):
        sync = last or not self.info.distributed
        return contextlib.nullcontext() if sync else self.model.no_sync()

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        (loss / accum).backward()

    def optimizer_step(self, loss_sum: torch.Tensor, guard: NonFiniteGuard, stop: bool = False) -> torch.Tensor:
        """The whole optimizer step: global-norm clipping (optim.grad_clip; 0: measure only), the
        non-finite guard's flags (one all-reduce), the update (skipped on the device when the flags or
        the AM statistics are non-finite), zeroed gradients. Returns the pre-clip norm (device)."""
        max_norm = self.cfg.optim.grad_clip
        norm = _full(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(),
                                                    max_norm if max_norm > 0 else math.inf))
        guarded_step(self.optimizer, guard, guard.observe(loss_sum, norm, stop))
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def grad_norm(self, measured: torch.Tensor) -> float:
        """The step's pre-clip global gradient norm, for logging (one host sync)."""
        return measured.item()

    # -- checkpoints (amllm/checkpoint.py's Checkpointer decides what to call) ----------------------
    @property
    def layout(self) -> str:
        """What this backend's native checkpoint files are; saved in meta.json as ``layout``."""
        return self.name

    def reads_natively(self, meta: dict, world_size: int) -> bool:
        """Whether :meth:`read` loads a checkpoint saved with ``meta`` on this world size. Otherwise the
        checkpointer reads it whole per parameter and calls :meth:`load_full`. model.pt/optimizer.pt
        are whole on any world size; FSDP2's DCP files reshard into a plain model too."""
        return meta.get("layout", meta.get("backend", "ddp")) in ("ddp", "fsdp2")

    def param_names(self) -> list[list[str]]:
        """The fully qualified parameter names of each optimizer param group, in the group's order:
        what maps index-keyed optimizer state (optimizer.pt) to parameters. Taken at set-up: FSDP2
        registers other (unsharded) parameter objects while a block stays gathered after a forward."""
        if self._names is None:
            names = {id(p): n for n, p in self.raw_model.named_parameters()}
            self._names = [[names[id(p)] for p in g["params"]] for g in self._template().param_groups]
        return self._names

    def _template(self) -> torch.optim.Optimizer:
        """The optimizer as built over the model's own parameters."""
        return self.optimizer

    def load_full(self, model: dict, optim: dict | None) -> None:
        """Load whole per-parameter state (``ckpt.read_full``: any backend's checkpoint, any world size):
        ``model`` fqn -> tensor; ``optim`` FQN-keyed optimizer state dict, or None (weights only)."""
        _load_weights(self.raw_model, model)
        if optim is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_by_index(optim, self.param_names()))

    def state_for_check(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts to check for non-finite values before a save."""
        return self.raw_model.state_dict(), self.optimizer.state_dict()

    def write(self, tmp: Path, model_state: dict | None = None, optim_state: dict | None = None) -> None:
        if self.info.is_main:
            ckpt.save_torch(model_state if model_state is not None else self.raw_model.state_dict(), tmp / "model.pt")
            ckpt.save_torch(optim_state if optim_state is not None else self.optimizer.state_dict(), tmp / "optimizer.pt")

    def read(self, path: Path, load_optimizer) -> None:
        """Load a checkpoint's model and (through `load_optimizer(state)`, which checks the
        hyper-parameters first) optimizer state. An FSDP2 (DCP) checkpoint loads here too."""
        if (path / "dcp").is_dir():
            from .fsdp import load_dcp

            load_dcp(path / "dcp", self.raw_model, self.optimizer)
            return
        self.raw_model.load_state_dict(ckpt.load_torch(path / "model.pt", map_location=self.info.device))
        # CPU first: the optimizer's load_state_dict moves each entry where it keeps it (torch keeps a
        # loaded `step` on whatever device it came on, and a GPU step would sync per tensor per step)
        load_optimizer(lambda: ckpt.load_torch(path / "optimizer.pt", map_location="cpu"))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class FSDP2Backend(Backend):
    name = "fsdp2"
    lockstep_eval = True

    def setup(self, model: torch.nn.Module) -> None:
        from .fsdp import apply_fsdp2

        ensure_process_group(self.info.device)  # fully_shard needs a group, also in one process
        prepare_blocks(model, self.cfg.train)  # AC, then per-block compile, then fully_shard
        self.raw_model = self.model = apply_fsdp2(model, self.cfg.train.precision,
                                                  reshard_after_forward=self.cfg.parallel.reshard_after_forward)
        # DTensor parameters: the AM optimizer all-reduces its partial sums over the mesh itself.
        self.optimizer = build_optimizer(self.cfg.optim, model.parameters(), self.info.device)
        self.param_names()

    def autocast(self):
        return contextlib.nullcontext()  # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)

    def micro_step(self, last: bool):
        # reduce-scatter gradients once per optimizer step, not once per micro-batch
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def state_for_check(self) -> tuple[dict, dict]:
        return {}, {}  # sharded: checked through the (replicated) grad norm and the loss instead

    def reads_natively(self, meta: dict, world_size: int) -> bool:
        return meta.get("layout", meta.get("backend")) == "fsdp2"  # DCP reshards N -> M itself

    def load_full(self, model: dict, optim: dict | None) -> None:
        from .fsdp import load_full

        load_full(self.model, self.optimizer if optim is not None else None, {"model": model, "optim": optim})

    def write(self, tmp: Path, model_state=None, optim_state=None) -> None:
        from .fsdp import save_dcp

        save_dcp(tmp / "dcp", self.model, self.optimizer)

    def read(self, path: Path, load_optimizer) -> None:
        from .fsdp import load_dcp

        load_dcp(path / "dcp", self.model, self.optimizer)


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg: Config, info: DistInfo):
        super().__init__(cfg, info)
        if cfg.train.nonfinite == "skip" and not cfg.optim.name.startswith("am_"):
            raise ConfigError(f"train.nonfinite=skip with parallel.backend=deepspeed needs optim.name=am_adamw or "
                              f"am_sgd (their step detects a non-finite gradient on the device; DeepSpeed measures "
                              f"the norm inside its own step), not {cfg.optim.name}; use train.nonfinite=stop")
        if cfg.train.precision == "bf16_pure":
            raise ConfigError("train.precision=bf16_pure is not available with parallel.backend=deepspeed; use "
                              "train.precision=bf16 (DeepSpeed keeps bf16 weights with fp32 master copies)")

    def setup(self, model: torch.nn.Module) -> None:
        from . import deepspeed_backend as dsb

        self.raw_model = prepare_blocks(model, self.cfg.train, compile=False)  # AC; the engine compiles itself
        optimizer = build_optimizer(self.cfg.optim, model.parameters(), self.info.device)
        self.engine = dsb.build_engine(model, optimizer, self.cfg)
        self.model = self.engine
        stage = int(self.engine.zero_optimization_stage())
        self.lockstep_eval = stage == 3
        self.param_names()

    @property
    def am_optimizer(self) -> torch.optim.Optimizer:
        from . import deepspeed_backend as dsb

        return dsb.am_optimizer(self.engine)

    def autocast(self):
        return contextlib.nullcontext()  # the engine runs the model in bf16 when bf16.enabled

    def micro_step(self, last: bool):
        return contextlib.nullcontext()  # the engine knows the accumulation boundary

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # a no-op but for DeepSpeed's micro-step counters

    def optimizer_step(self, loss_sum: torch.Tensor, guard: NonFiniteGuard, stop: bool = False) -> None:
        """DeepSpeed clips (gradient_clipping), steps and zeroes inside ``engine.step()``; the norm is
        only known in there, so the guard's flags carry the loss and the stop request, and the AM
        optimizer DeepSpeed steps (``skip_nonfinite``) catches non-finite gradients from its own
        all-reduced statistics and skips the update on the device. Returns None (the norm is read
        from the engine on logged steps)."""
        flags = guard.observe(loss_sum, None, stop)
        guarded_step(self.am_optimizer, guard, flags, self.engine.step)

    def set_lr(self, lr: float) -> None:
        from . import deepspeed_backend as dsb

        dsb.set_lr(self.engine, lr)

    def grad_norm(self, measured) -> float:
        norm = self.engine.get_global_grad_norm()  # DeepSpeed measured it inside step()
        return float(norm) if norm is not None else float("nan")

    def state_for_check(self) -> tuple[dict, dict]:
        return {}, {}

    @property
    def layout(self) -> str:
        """DeepSpeed's files depend on the ZeRO stage and (ZeRO-1's BF16 optimizer) the precision."""
        return f"deepspeed-zero{int(self.engine.zero_optimization_stage())}-{self.cfg.train.precision}"

    def reads_natively(self, meta: dict, world_size: int) -> bool:
        # DeepSpeed's own loader needs the same world size and ZeRO layout; elsewhere: whole state
        saved = meta.get("layout", self.layout if meta.get("backend") == "deepspeed" else None)  # older: no layout
        return saved == self.layout and meta.get("world_size") == world_size

    def _template(self) -> torch.optim.Optimizer:
        from . import deepspeed_backend as dsb

        client = self.engine.basic_optimizer
        return client.template if isinstance(client, dsb.ZeroAMAdapter) else client

    def load_full(self, model: dict, optim: dict | None) -> None:
        from . import deepspeed_backend as dsb

        dsb.load_full(self.engine, model, optim, self.param_names())

    def write(self, tmp: Path, model_state=None, optim_state=None) -> None:
        from . import deepspeed_backend as dsb

        dsb.save_checkpoint(self.engine, tmp, tag="deepspeed")

    def read(self, path: Path, load_optimizer) -> None:
        from . import deepspeed_backend as dsb

        dsb.load_checkpoint(self.engine, path, tag="deepspeed")


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


BACKENDS = {"ddp": Backend, "fsdp2": FSDP2Backend, "deepspeed": DeepSpeedBackend}


def make_backend(cfg: Config, info: DistInfo) -> Backend:
    return BACKENDS[cfg.parallel.backend](cfg, info)


def _load_weights(model: torch.nn.Module, full: dict) -> None:
    """``model.load_state_dict(full)`` for parameters; buffers the checkpoint lacks keep their values
    (non-persistent ones, e.g. rotary frequencies, are rebuilt from the config)."""
    missing = [n for n, _ in model.named_parameters() if n not in full]
    if missing:
        raise CheckpointError(f"the checkpoint has no {missing[0]} (and {len(missing) - 1} more parameters); "
                              f"it was saved for another model")
    model.load_state_dict(full, strict=False)
