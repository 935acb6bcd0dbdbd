"""The three ways train.py distributes a step, behind one small interface.

    backend = make_backend(cfg, info)
    backend.setup(model)                       # wrap (DDP / fully_shard / deepspeed.initialize), build optimizer
    for each micro-batch i:
        with backend.micro_step(last):         # gradient sync on the last micro-batch only
            loss = backend.model(input_ids=x, targets=y)   # LlamaLM: the loss, chunked
        backend.backward(loss, accum)
    grad_norm = backend.optimizer_step(loss_sum, guard, stop)   # clip, guard, update, zero grads
    backend.write(tmp_dir) / backend.read(ckpt_dir)

The backend owns the whole optimizer step, so no caller needs to know that DeepSpeed clips and
measures the norm inside its own step. A step makes no host read (see faults.NonFiniteGuard).

| backend   | model                      | AM statistics                          | checkpoint files        |
|-----------|----------------------------|----------------------------------------|-------------------------|
| ddp       | DDP (or plain, 1 process)  | no reduction: every rank has full grads | model.pt, optimizer.pt  |
| fsdp2     | fully_shard per block+root | all-reduced over the DTensor mesh      | dcp/ (reshards N -> M)  |
| deepspeed | DeepSpeed engine, ZeRO 0-3 | one all-reduce, deferred to the last   | deepspeed/ (same world) |
|           |                            | per-group call (ZeroAMAdapter)         |                         |

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
from ..faults import NonFiniteGuard, takes_found_inf
from ..optim_factory import build_optimizer
from .blocks import prepare_blocks
from .distributed import DistInfo, ensure_process_group, wrap_ddp


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a clip norm under FSDP2), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Backend:
    name = "ddp"
    files: tuple[str, ...] = ("model.pt", "optimizer.pt")
    lockstep_eval = False  # True when a forward is itself collective (sharded parameters)

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.model = self.raw_model = self.optimizer = None

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module) -> None:
        self.raw_model = prepare_blocks(model, self.cfg.train)  # AC, then per-block compile, then DDP
        self.model = wrap_ddp(model, self.info)
        # DDP hands every rank the full averaged gradient: AM statistics need no reduction.
        self.optimizer = build_optimizer(self.cfg.optim, model.parameters(), self.info.device, reducer=None)

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

    # -- checkpoints --------------------------------------------------------------------------
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
    files = ("dcp",)
    lockstep_eval = True

    def setup(self, model: torch.nn.Module) -> None:
        from .fsdp import apply_fsdp2

        ensure_process_group(self.info.device)  # fully_shard needs a group, also in one process
        prepare_blocks(model, self.cfg.train)  # AC, then per-block compile, then fully_shard
        self.raw_model = self.model = apply_fsdp2(model, self.cfg.train.precision,
                                                  reshard_after_forward=self.cfg.parallel.reshard_after_forward)
        # DTensor parameters: the AM optimizer all-reduces its partial sums over the mesh itself.
        self.optimizer = build_optimizer(self.cfg.optim, model.parameters(), self.info.device, reducer=None)

    def autocast(self):
        return contextlib.nullcontext()  # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)

    def micro_step(self, last: bool):
        # reduce-scatter gradients once per optimizer step, not once per micro-batch
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def state_for_check(self) -> tuple[dict, dict]:
        return {}, {}  # sharded: checked through the (replicated) grad norm and the loss instead

    def write(self, tmp: Path, model_state=None, optim_state=None) -> None:
        from .fsdp import save_dcp

        save_dcp(tmp / "dcp", self.model, self.optimizer)

    def read(self, path: Path, load_optimizer) -> None:
        from .fsdp import load_dcp

        load_dcp(path / "dcp", self.model, self.optimizer)


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    files = ("deepspeed",)

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
        optimizer = build_optimizer(self.cfg.optim, model.parameters(), self.info.device, reducer=None)
        self.engine = dsb.build_engine(model, optimizer, self.cfg)
        self.model = self.engine
        stage = int(self.engine.zero_optimization_stage())
        self.lockstep_eval = stage == 3

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

    def write(self, tmp: Path, model_state=None, optim_state=None) -> None:
        from . import deepspeed_backend as dsb

        dsb.save_checkpoint(self.engine, tmp, client_state={}, tag="deepspeed")

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


def check_resumable(meta: dict, backend: Backend, world_size: int, path: Path) -> None:
    """Which checkpoints a backend can resume: its own; FSDP2's DCP files on any world size (and by
    the plain/DDP path too); DeepSpeed's only on the same world size."""
    saved = meta.get("backend", "ddp")
    readable = saved == backend.name or (saved == "fsdp2" and backend.name == "ddp")
    if not readable:
        raise CheckpointError(f"{path} was written by parallel.backend={saved}; resume it with "
                              f"parallel.backend={saved} (or start a new run_dir)")
    if saved == "deepspeed" and meta.get("world_size") != world_size:
        raise CheckpointError(f"{path} is a DeepSpeed checkpoint of {meta.get('world_size')} ranks; DeepSpeed "
                              f"resumes only on the same world size: launch {meta.get('world_size')} ranks")


def full_model_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of a checkpoint, in one process, whatever backend wrote it:
    model.pt (DDP), dcp/ (FSDP2: torch's DCP-to-torch converter), deepspeed/ (ZeRO's fp32 merge)."""
    step_dir = Path(step_dir)
    if (step_dir / "model.pt").is_file():
        return ckpt.load_torch(step_dir / "model.pt")
    if (step_dir / "dcp").is_dir():
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(step_dir / "dcp", Path(tmp) / "full.pt")
            return ckpt.load_torch(Path(tmp) / "full.pt")["model"]
    if (step_dir / "deepspeed").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="deepspeed")
        return {k: v.contiguous() for k, v in state.items()}
    raise CheckpointError(f"{step_dir}: no model.pt, dcp/ or deepspeed/ inside; not an amllm checkpoint")
