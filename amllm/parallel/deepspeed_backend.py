"""DeepSpeed ZeRO 0-3 for the trainer (:class:`DeepSpeedBackend`): the JSON config checked against the
trainer's, the engine, and its checkpoints.

AM optimizers get an exact global (or per-layer) β through :class:`zero_adapter.ZeroAMAdapter`, the
client optimizer DeepSpeed steps; DeepSpeed's private names are behind deepspeed_compat.py.

Cases (``engine.optimizer`` type → mechanism):

* ZeRO-0 fp32 (client itself) / ZeRO-0 bf16 (``FP16_UnfusedOptimizer``): every rank holds whole
  parameters and the full averaged gradient: the AM optimizer is passed as is, no reduction.
* ``BF16_Optimizer`` (ZeRO-1 + bf16 + fp32 grad accumulation): one call with all groups: exact.
* ZeRO-1/2 (``DeepSpeedZeroOptimizer``), ZeRO-3 (``..._Stage3``), any number of groups and
  sub-groups: exact by deferral. Cost: the fp32 grads of all groups/sub-groups are alive at the
  same time (ZeRO-3's ``sub_group_size`` no longer bounds step-time grad memory); no extra
  collective, no extra copy beyond the bit16 refresh of the deferred shards.
* Refused, with the setting to change: optimizer offload or NVMe swapping with more than one
  group/sub-group (the deferred shards' bit16 copy goes through offload buffers the adapter
  does not drive), MoE param groups, ``elastic_checkpoint`` (drops the AM state), fp16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import optimizer_by_index
from ..config import Config, ConfigError
from ..distributed import DistInfo
from ..guard import NonFiniteGuard
from ..optim._base import AMOptimizerBase
from ..optim_factory import build_optimizer
from .backend import Backend, LoadOptimizer, guarded_step
from .blocks import prepare_blocks
from .deepspeed_compat import check_deepspeed_version, client_optimizer, skip_host_norm_check
from .zero_adapter import ZeroAMAdapter, save_layout

TAG = "deepspeed"  # step-N/deepspeed/: DeepSpeed's checkpoint tag inside amllm's step directory


# ---- DeepSpeed JSON <-> trainer config -------------------------------------------------------------------

_AUTO = (None, "auto")


def _agree(ds: dict, key: str, value: Any, cfg_key: str, cfg_value: Any, prefix: str = "") -> None:
    """ds[key] = value when missing/"auto"; else it must equal value (one-line error naming both)."""
    cur = ds.get(key)
    if cur in _AUTO:
        ds[key] = value
    elif cur != value:
        name = prefix + key
        raise ConfigError(f"DeepSpeed config {name}={cur!r} disagrees with {cfg_key}={cfg_value!r} "
                          f"(which gives {value!r}); set {name} to \"auto\" or remove it")


def validate_ds_config(ds_json: dict | str | os.PathLike, cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config to use: a copy of ``ds_json`` with the trainer's settings filled in.

    Derived from the trainer config (never silently overridden): ``train_batch_size`` =
    ``train.batch_size``, ``train_micro_batch_size_per_gpu`` = ``train.micro_batch_size``,
    ``gradient_accumulation_steps`` = batch / (micro x world), ``gradient_clipping`` =
    ``optim.grad_clip``, ``bf16.enabled`` = ``train.precision == "bf16"``. A key that is absent
    or ``"auto"`` is filled in; a value that disagrees raises :class:`ConfigError`.
    ``zero_allow_untested_optimizer`` is set, and ``zero_force_ds_cpu_optimizer`` is cleared under
    optimizer offload (AM-AdamW is a client optimizer).
    """
    if not isinstance(ds_json, dict):
        path = Path(ds_json)
        if not path.is_file():
            raise ConfigError(f"parallel.deepspeed_config={str(path)!r} not found; see configs/deepspeed/")
        try:
            ds_json = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    ds = json.loads(json.dumps(ds_json))  # deep copy
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.batch_size % per_step:
        raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size x world size "
                          f"= {t.micro_batch_size} x {world_size}; change one of them")
    _agree(ds, "train_batch_size", t.batch_size, "train.batch_size", t.batch_size)
    _agree(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", t.micro_batch_size)
    _agree(ds, "gradient_accumulation_steps", t.batch_size // per_step, "train.batch_size / (micro_batch_size x world)",
           f"{t.batch_size} / ({t.micro_batch_size} x {world_size})")
    _agree(ds, "gradient_clipping", float(cfg.optim.grad_clip), "optim.grad_clip", cfg.optim.grad_clip)
    if t.precision == "bf16_pure":
        raise ConfigError("train.precision=bf16_pure has no DeepSpeed equivalent (DeepSpeed keeps fp32 master weights); "
                          "use train.precision=bf16 with parallel.backend=deepspeed")
    bf16 = dict(ds.get("bf16") or {})
    _agree(bf16, "enabled", t.precision == "bf16", "train.precision", t.precision, prefix="bf16.")
    ds["bf16"] = bf16
    if (ds.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError("DeepSpeed config fp16.enabled=true is not supported; use train.precision=bf16 "
                          "(bf16.enabled is derived from it)")
    ds.pop("fp16", None)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"DeepSpeed config has {key!r}; remove it: the trainer builds the optimizer "
                              f"(optim.*) and the lr schedule (schedule.*)")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("elastic_checkpoint"):
        raise ConfigError("DeepSpeed config zero_optimization.elastic_checkpoint=true drops the AM optimizer's "
                          "β state from checkpoints; set it to false")
    if ds.get("zero_allow_untested_optimizer") is False:
        raise ConfigError("DeepSpeed config zero_allow_untested_optimizer=false rejects AM-AdamW; set it to true")
    ds["zero_allow_untested_optimizer"] = True
    if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
        # DeepSpeed refuses client optimizers under offload unless told otherwise; ours is always one
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            raise ConfigError("DeepSpeed config zero_force_ds_cpu_optimizer=true rejects AM-AdamW under "
                              "offload_optimizer; set it to false or remove it")
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


# ---- the engine ------------------------------------------------------------------------------------------

def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, ds_config=None):
    """``deepspeed.initialize`` with the validated config; AM optimizers get an exact global β.

    ``optimizer`` is built over ``model``'s parameters as for a single process (``reducer=None``);
    for ZeRO-1/2/3 it is re-created over DeepSpeed's flat shards (see :class:`ZeroAMAdapter`).
    ``ds_config``: a dict or path (default ``cfg.parallel.deepspeed_config``).
    """
    import deepspeed
    import torch.distributed as dist

    check_deepspeed_version(deepspeed.__version__)
    if not dist.is_initialized():  # the world size decides gradient_accumulation_steps: join first
        deepspeed.init_distributed()  # env from the launcher; NCCL on CUDA, gloo/oneCCL on CPU
    world = dist.get_world_size()
    ds = validate_ds_config(ds_config if ds_config is not None else cfg.parallel.deepspeed_config, cfg, world)
    stage = int(ds["zero_optimization"].get("stage", 0))
    is_am = isinstance(optimizer, AMOptimizerBase)
    if is_am and optimizer.reducer is not None:
        raise ConfigError("build the AM optimizer with reducer=None for parallel.backend=deepspeed; "
                          "the reduction group is DeepSpeed's and is set by build_engine")
    client = ZeroAMAdapter(optimizer) if is_am and stage > 0 else optimizer
    if is_am:  # DeepSpeed's per-step host check of the norm is the AM optimizer's device-side skip
        ds["bf16"].setdefault("check_grad_overflow", False)
        skip_host_norm_check()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds)
    if isinstance(client, ZeroAMAdapter):
        if engine.optimizer is client:  # not expected with ZeRO > 0; keep the template path working
            raise RuntimeError("DeepSpeed did not wrap the optimizer for ZeRO stage > 0")
        client.bind(engine.optimizer)
    if cfg.train.compile:
        engine.compile()  # DeepSpeed's own: torch.compile of the module, aware of its ZeRO hooks
    return engine


def am_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer that holds β (``last_beta``, ``fallback_count``, ``state_dict()["am_state"]``)."""
    client = client_optimizer(engine)
    return client.am if isinstance(client, ZeroAMAdapter) else client


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every param group (the schedule's value for this step)."""
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def save_checkpoint(engine, save_dir: str | os.PathLike, tag: str = TAG) -> None:
    """``engine.save_checkpoint`` (every rank must call it) + this rank's ``am_layout_rank<r>.pt``.

    The model, DeepSpeed's fp32 shards and the AM optimizer's state (moments, per-group ``prev_lr``,
    and ``am_state`` = π, last β, β step, fallback count) go into DeepSpeed's per-rank files. The
    layout file says which parameter elements each piece of this rank's AM state holds, so that
    ``zero_adapter.read_zero_full`` can reassemble the checkpoint per parameter for another backend or
    world size. The trainer's state and the RNG streams are the Checkpointer's (amllm/checkpointer.py).
    """
    import torch.distributed as dist

    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    client = client_optimizer(engine)
    if isinstance(client, ZeroAMAdapter):
        save_layout(client, engine.module, Path(save_dir) / tag, dist.get_rank() if dist.is_initialized() else 0)


def load_checkpoint(engine, load_dir: str | os.PathLike, tag: str = TAG, with_optimizer: bool = True) -> None:
    """Inverse of :func:`save_checkpoint`, on the same world size and ZeRO layout. ``with_optimizer=False``:
    the weights alone (DeepSpeed's ``load_module_only``: the module's weights, and the fp32 master copies
    refreshed from them), the optimizer state starting fresh."""
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=with_optimizer,
                                     load_lr_scheduler_states=with_optimizer, load_module_only=not with_optimizer)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {load_dir}")
    client = client_optimizer(engine)
    if isinstance(client, ZeroAMAdapter):
        client.zero_padding()


# ---- the backend -----------------------------------------------------------------------------------------

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
        self.raw_model = prepare_blocks(model, self.cfg.train, compile=False)  # AC; the engine compiles itself
        optimizer = build_optimizer(self.cfg.optim, model.parameters(), self.info.device,
                                    sr_seed=self.cfg.train.seed)
        self._take_names(optimizer)  # before DeepSpeed rewrites the groups to its flat shards
        self.engine = self.model = build_engine(model, optimizer, self.cfg)
        self.optimizer = am_optimizer(self.engine)  # lr per group is set on DeepSpeed's groups (set_lr)
        self.lockstep_eval = int(self.engine.zero_optimization_stage()) == 3

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # a no-op but for DeepSpeed's micro-step counters

    def optimizer_step(self, loss_sum: torch.Tensor, guard: NonFiniteGuard, stop: bool = False) -> None:
        """DeepSpeed clips (gradient_clipping), steps and zeroes inside ``engine.step()``; the norm is
        only known in there, so the guard's flags carry the loss and the stop request, and the AM
        optimizer DeepSpeed steps (``skip_nonfinite``) catches non-finite gradients from its own
        all-reduced statistics and skips the update on the device."""
        guarded_step(self.optimizer, guard, guard.observe(loss_sum, None, stop), self.engine.step)

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()  # DeepSpeed measured it inside step()
        return float(norm) if norm is not None else float("nan")

    def set_lr(self, lr: float) -> None:
        set_lr(self.engine, lr)

    @property
    def layout(self) -> str:
        """DeepSpeed's files depend on the ZeRO stage and (ZeRO-1's BF16 optimizer) the precision."""
        return f"deepspeed-zero{int(self.engine.zero_optimization_stage())}-{self.cfg.train.precision}"

    def reads_natively(self, meta: dict, world_size: int) -> bool:
        # DeepSpeed's own loader needs the same world size and ZeRO layout; elsewhere: whole state
        saved = meta.get("layout", self.layout if meta.get("backend") == "deepspeed" else None)  # older: no layout
        return saved == self.layout and meta.get("world_size") == world_size

    def write(self, tmp: Path, model_state: Optional[dict] = None, optim_state: Optional[dict] = None) -> None:
        save_checkpoint(self.engine, tmp)

    def read(self, path: Path, load_optimizer: Optional[LoadOptimizer]) -> None:
        # DeepSpeed loads the optimizer state itself; the hyper-parameters were checked from trainer.pt
        load_checkpoint(self.engine, path, with_optimizer=load_optimizer is not None)

    @torch.no_grad()
    def load_full(self, model: dict, optim: Optional[dict]) -> None:
        """Whole per-parameter state into the built engine. ZeRO-1/2/3 with an AM optimizer: this rank's fp32
        shards and AM state pieces are cut out of the whole tensors (:meth:`ZeroAMAdapter.load_full`), then
        the bit16 weights the forward uses follow: ZeRO-1/2 hold them whole on every rank (copied in),
        ZeRO-3 as partitions (refreshed from the fp32 shards). ZeRO-0 fp32: the client optimizer over the
        module's own parameters, loaded as in one process."""
        engine = self.engine
        client = client_optimizer(engine)
        adapter = isinstance(client, ZeroAMAdapter)
        if not adapter and engine.optimizer is not client:
            raise ConfigError(f"resuming another backend's checkpoint under DeepSpeed's "
                              f"{type(engine.optimizer).__name__} with {self.cfg.optim.name} is not supported; use "
                              f"an AM optimizer with ZeRO 1-3, or resume it on the backend that wrote it")
        if adapter:
            client.load_full(model, optim, {id(p): n for n, p in engine.module.named_parameters()})
        if adapter and int(engine.zero_optimization_stage()) == 3:
            client.refresh_bit16()
        else:
            for n, p in engine.module.named_parameters():
                p.data.copy_(model[n].reshape(p.shape))
        if not adapter and optim is not None:
            client.load_state_dict(optimizer_by_index(optim, self.param_names()))
