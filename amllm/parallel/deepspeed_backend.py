"""DeepSpeed ZeRO for the AM optimizers: config validation, engine, exact global β, checkpoints.

What DeepSpeed does to a client optimizer is measured in ``docs/deepspeed_notes.md``. In short:
ZeRO-1/2 call ``step()`` once per param group and ZeRO-3 once per sub-group, each call seeing
only that group's flat fp32 slice; DeepSpeed copies fp32 → bit16 right after each call.
A β computed inside such a call would be a per-group β. :class:`ZeroAMAdapter` makes it the
global one (or the per-layer ones) *exactly*, in every case:

* the adapter is what DeepSpeed sees as the client optimizer; its calls only **record** the
  flat shard and its (already averaged and clipped) gradient;
* at the call that delivers the last shard of the engine step, it runs ONE step of the real
  AM optimizer over all of this rank's shards: partial sums, one all-reduce over the
  data-parallel group, β, update;
* then it re-copies fp32 → bit16 for the shards whose copy DeepSpeed had already taken, before
  DeepSpeed's all-gather (ZeRO-1/2) or the next forward (ZeRO-3).

Padding: ZeRO-3 pads every parameter's slice and leaves *uninitialised* memory in the fp32
padding (seen: -1.5e28); AM reads x as g·x and δ·x, so garbage that happens to be inf/NaN would
poison β. Padding of x is zeroed at bind time and after every checkpoint load; g, d, v are
zero there, so padding adds exactly 0 to every sum and stays 0. Per-layer β cuts each flat
shard into views, one per parameter fragment, located with DeepSpeed's fragment addresses
(ZeRO-1/2, BF16_Optimizer: ``param._hp_mapping``; ZeRO-3: the per-parameter partition
layout), each view one layer of ``set_layer_map`` (padding belongs to no view).

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
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

from amllm.config import Config, ConfigError
from amllm.optim._base import AMOptimizerBase

# ---------------------------------------------------------------------------------------
# Which DeepSpeed versions the adapter is tested with
# ---------------------------------------------------------------------------------------

#: [lowest, above highest) DeepSpeed versions the adapter is tested with; pyproject's extras say the
#: same (tests/test_deepspeed_config.py checks both agree). The adapter reads ~20 private attributes
#: of DeepSpeed's ZeRO optimizers, listed in docs/deepspeed_notes.md; re-run tools/ds_probe.py and
#: tests/test_deepspeed_zero.py before widening the range.
DEEPSPEED_TESTED = ("0.16", "0.20")


def check_deepspeed_version(version: str) -> None:
    """Refuse a DeepSpeed older than the adapter knows; warn (one line) for a newer, untested one."""
    import warnings

    from packaging.version import Version

    low, high = DEEPSPEED_TESTED
    pin = f"pip install 'deepspeed>={low},<{high}'"
    if Version(version) < Version(low):
        raise ConfigError(f"deepspeed {version} is older than the adapter supports ({low}); {pin}")
    if Version(version) >= Version(high):
        warnings.warn(f"deepspeed {version} is untested with amllm's ZeRO adapter (tested: >={low},<{high}; it reads "
                      f"private attributes, see docs/deepspeed_notes.md); {pin} if the run misbehaves", stacklevel=2)


# ---------------------------------------------------------------------------------------
# DeepSpeed JSON <-> trainer config
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# The adapter DeepSpeed sees as the client optimizer
# ---------------------------------------------------------------------------------------


def _layer_ids(am: AMOptimizerBase) -> tuple[dict[int, int], int]:
    """id(param) -> β layer, as the AM optimizer numbers its own layers (global: all 0; per_layer:
    per tensor, or per group with ``layer_per_group``), so that ``last_beta[k]`` means the same
    layer as in a single-process run. Every rank gets the same numbering."""
    layers, n_layers = am._layers()
    return {id(p): layer for p, layer in layers.items()}, n_layers


class _Shard:
    """One flat fp32 tensor DeepSpeed hands to the client, with what the adapter needs."""

    __slots__ = ("flat", "group", "slices", "refresh")

    def __init__(self, flat, group, slices, refresh):
        self.flat = flat  # the fp32 tensor the client updates (1-D)
        self.group = group  # index of its param group
        # [(layer, start, end, param, offset in the flattened param)] of real elements; the rest is padding
        self.slices = slices
        self.refresh = refresh  # () -> None: copy this shard's fp32 into its bit16 copy


def _shards_zero12(ds_opt, layer_of) -> list[_Shard]:
    shards = []
    pid_of = [torch.distributed.get_rank(group=g) for g in ds_opt.real_dp_process_group]
    for i, flat in enumerate(ds_opt.single_partition_of_fp32_groups):
        def refresh(i=i, flat=flat):
            ds_opt.parallel_partitioned_bit16_groups[i][pid_of[i]].data.copy_(flat.data)
        shards.append(_Shard(flat, i, _fragment_slices(ds_opt.bit16_groups[i], layer_of), refresh))
    return shards


def _shards_bf16(ds_opt, layer_of) -> list[_Shard]:
    return [_Shard(flat, i, _fragment_slices(ds_opt.bf16_groups[i], layer_of), None)
            for i, flat in enumerate(ds_opt.fp32_groups_flat_partition)]


def _fragment_slices(lp_params, layer_of) -> list[tuple]:
    """(layer, start, end, param, offset in param) in the flat fp32 slice, from DeepSpeed's lp→hp
    fragment addresses."""
    out = []
    for p in lp_params:
        hp = getattr(p, "_hp_mapping", None)
        if hp is not None:  # None: no element of p in this rank's slice
            a = hp.hp_fragment_address
            out.append((layer_of[id(p)], a.start, a.start + a.numel, p, hp.lp_fragment_address.start))
    return sorted(out, key=lambda s: s[1])


def _shards_zero3(ds_opt, layer_of) -> list[_Shard]:
    rank = torch.distributed.get_rank(group=ds_opt.dp_process_group)
    shards = []
    for s, flat in enumerate(ds_opt.fp32_partitioned_groups_flat):
        slices, off = [], 0
        for p, part in zip(ds_opt.fp16_groups[s], ds_opt.fp16_partitioned_groups[s]):
            # every rank holds ceil(numel / world) elements of p; the last ranks' tails are padding
            real = max(0, min(p.ds_numel - rank * p.partition_numel(), part.ds_numel))
            if real:
                slices.append((layer_of[id(p)], off, off + real, p, rank * p.partition_numel()))
            off += part.ds_numel
        if off != flat.numel():
            raise RuntimeError(f"ZeRO-3 sub-group {s}: partitions add up to {off} elements, the fp32 flat has "
                               f"{flat.numel()}; this DeepSpeed version lays sub-groups out differently "
                               f"(see docs/deepspeed_notes.md)")
        shards.append(_Shard(flat, ds_opt.sub_group_to_group_id[s], slices,
                             lambda s=s: ds_opt._reassign_or_swap_out_partitioned_parameters(s)))
    return shards


def _reduce_group(dp_group, shards: list[_Shard]):
    """The group AM's packed sums are all-reduced over: DeepSpeed's data-parallel group, unless the
    shards live where that group has no backend. Under optimizer offload the fp32 shards, the AM
    state and the sums are CPU tensors, and NCCL serves CUDA tensors only: then a gloo group over
    the same ranks is built here (bind runs on every rank, so every rank joins) and the CPU sums
    are reduced there, with no device copy and no host sync. One rank: no reduction at all."""
    import torch.distributed as dist

    from amllm.optim.reduce import group_serves

    devices = {s.flat.device.type for s in shards}
    if len(devices) > 1:
        raise RuntimeError(f"DeepSpeed's fp32 shards are on several device types {sorted(devices)}; "
                           f"see docs/deepspeed_notes.md")
    if dist.get_world_size(dp_group) == 1:
        return None  # the shards are the whole model: nothing to sum (and NCCL could not sum CPU tensors)
    if not devices or group_serves(dp_group, torch.device(devices.pop())):
        return dp_group
    ranks = dist.get_process_group_ranks(dp_group)
    if len(ranks) != dist.get_world_size():
        raise ConfigError("AM-AdamW with ZeRO optimizer offload needs the data-parallel group to span all ranks "
                          "(no model/sequence parallelism); set zero_optimization.offload_optimizer.device=none")
    return dist.new_group(ranks, backend="gloo")


class ZeroAMAdapter(torch.optim.Optimizer):
    """What DeepSpeed sees as the client optimizer; runs one exact AM step per engine step.

    Built around an AM optimizer over the model's parameters (the ``template``: its class, its
    hyper-parameters, its param groups). DeepSpeed rewrites this adapter's param groups to its
    flat shards; :meth:`bind` then builds ``self.am``, an optimizer of the template's class over
    those shards (per-layer: over views of them, one per parameter fragment) with ``reducer`` =
    the data-parallel group (a gloo twin of it when offload puts the shards on the CPU and the
    group is NCCL: :func:`_reduce_group`). Use ``self.am`` for ``last_beta`` / ``fallback_count``; learning rates are
    set on this adapter's (= DeepSpeed's) param groups and copied to ``self.am`` at each step.
    """

    def __init__(self, template: AMOptimizerBase):
        self.template = template
        self.am: Optional[AMOptimizerBase] = None
        self._shards: list[_Shard] = []
        self._pieces: list = []  # (shard, tensor self.am steps, offset in the flat or None, layer)
        self._index: dict[int, int] = {}
        self._pending: dict[int, Optional[torch.Tensor]] = {}
        self._groups = None
        self._ds_opt = None
        #: Test-only hook (not a user option): False steps at every DeepSpeed call with the shards
        #: shown, i.e. a per-group β -- the negative control of the exactness tests.
        self._defer = True
        self._relink = True
        groups = [{**{k: v for k, v in g.items() if k not in ("params", "prev_lr")}, "params": list(g["params"])}
                  for g in template.param_groups]
        super().__init__(groups, dict(template.defaults))

    # the state DeepSpeed links fragments to and checkpoints is the bound optimizer's
    @property
    def state(self):
        return self.am.state if self.am is not None else self._own_state

    @state.setter
    def state(self, value):
        self._own_state = value

    def bind(self, ds_opt) -> None:
        """Attach to DeepSpeed's ZeRO optimizer after ``deepspeed.initialize``."""
        kind = type(ds_opt).__name__
        layer_of, n_layers = _layer_ids(self.template)
        if kind == "DeepSpeedZeroOptimizer":
            shards = _shards_zero12(ds_opt, layer_of)
            offload = ds_opt.cpu_offload
            group = ds_opt.real_dp_process_group
        elif kind == "DeepSpeedZeroOptimizer_Stage3":
            shards = _shards_zero3(ds_opt, layer_of)
            offload = bool(ds_opt.offload_optimizer or ds_opt.swap_optimizer)
            group = [ds_opt.dp_process_group]
        elif kind == "BF16_Optimizer":
            shards = _shards_bf16(ds_opt, layer_of)
            offload = False
            group = ds_opt.real_dp_process_group
        else:
            raise RuntimeError(f"ZeroAMAdapter does not know DeepSpeed's {kind}; see docs/deepspeed_notes.md")
        if len({id(g) for g in group}) != 1:
            raise ConfigError("AM-AdamW under DeepSpeed needs one data-parallel group for all param groups "
                              "(MoE/expert groups are not supported); remove the expert param groups")
        if offload and len(shards) > 1:
            raise ConfigError("AM-AdamW with ZeRO optimizer offload/NVMe needs a single param group and sub-group "
                              "for an exact global β; set zero_optimization.offload_optimizer.device=none or pass "
                              "one param group (and a sub_group_size above the model size)")
        self._ds_opt, self._shards = ds_opt, shards
        self._index = {id(s.flat): k for k, s in enumerate(shards)}
        self._groups = self.param_groups  # DeepSpeed swaps the list per call and restores this one
        # What self.am steps. Global β: the flat shards themselves (padding zeroed below adds 0).
        # Per-layer β: one view per (layer, slice) of each flat -- int layers keep AM's multi-tensor
        # path and need no per-element int64 map (8 bytes/element); padding is left out entirely.
        if self.template.defaults.get("per_layer", False):
            self._pieces = [(s, s.flat.detach().narrow(0, a, b - a), a, layer) for s in shards for layer, a, b, *_ in s.slices]
        else:
            self._pieces = [(s, s.flat, None, 0) for s in shards]
        inner_groups = [{**{k: v for k, v in g.items() if k != "params"},
                         "params": [t for s, t, _, _ in self._pieces if s.group == i]} for i, g in enumerate(self._groups)]
        self.am = type(self.template)(inner_groups, reducer=_reduce_group(group[0], shards), **self.template.defaults)
        self.am.impl = self.template.impl  # the kernel path chosen for the template (optim.impl)
        if self.template.defaults.get("per_layer", False):
            self.am.set_layer_map({t: layer for _, t, _, layer in self._pieces}, n_layers)
        self.zero_padding()

    @torch.no_grad()
    def zero_padding(self) -> None:
        """Zero the x padding of every shard (ZeRO-3 leaves uninitialised memory there)."""
        for s in self._shards:
            covered = torch.zeros(s.flat.numel(), dtype=torch.bool, device=s.flat.device)
            for _, a, b, *_ in s.slices:
                covered[a:b] = True
            s.flat.data.masked_fill_(~covered, 0.0)

    @torch.no_grad()
    def step(self, closure=None):
        if self.am is None:
            raise RuntimeError("ZeroAMAdapter.step() before bind(): build the engine with "
                               "amllm.parallel.deepspeed_backend.build_engine")
        shown = [p for g in self.param_groups for p in g["params"]]
        for p in shown:
            k = self._index.get(id(p))
            if k is None:
                raise RuntimeError("DeepSpeed passed a tensor the adapter did not bind; DeepSpeed's ZeRO layout "
                                   "changed (see docs/deepspeed_notes.md)")
            if id(p) in self._pending:
                raise RuntimeError(f"DeepSpeed passed shard {k} twice in one engine step; the per-group call "
                                   f"protocol changed (see docs/deepspeed_notes.md)")
            self._pending[id(p)] = p.grad
        if self._defer and len(self._pending) < len(self._shards):
            return None  # wait for the remaining groups / sub-groups of this engine step
        now = {id(p) for p in shown}
        for g_ds, g_am in zip(self._groups, self.am.param_groups):  # lr / wd set by the trainer
            for k, v in g_ds.items():
                if k not in ("params", "prev_lr"):
                    g_am[k] = v
        for s, t, a, _ in self._pieces:
            g = self._pending.get(id(s.flat))
            if a is not None:  # a view of the flat (per-layer)
                if t.data_ptr() != s.flat.data_ptr() + a * t.element_size():
                    raise RuntimeError("DeepSpeed reallocated a flat fp32 shard after bind(); the per-layer views "
                                       "no longer alias it (see docs/deepspeed_notes.md)")
                g = None if g is None else g.narrow(0, a, t.numel())
            t.grad = g
        try:
            self.am.step()
        finally:
            for s, t, a, _ in self._pieces:
                if a is not None or id(s.flat) not in now:
                    t.grad = None  # DeepSpeed already dropped the flats' grads of earlier calls
            self._pending.clear()
        for s in self._shards:
            if id(s.flat) not in now and s.refresh is not None:
                s.refresh()  # DeepSpeed took this shard's bit16 copy before the update
        if self._relink and hasattr(self._ds_opt, "_hp_optimizer_states_linked"):
            # DeepSpeed linked its fragment views to the state after its first call, when the state
            # was still empty (deferred) or since replaced (checkpoint load): let it link once more
            self._ds_opt._hp_optimizer_states_linked = False
            self._relink = False
        return None

    # -- a checkpoint layout any backend can read (amllm/checkpoint.py) ------------------------
    def layout(self, names: dict[int, str]) -> dict:
        """Where each element of this rank's AM state lives in the model: for piece ``i`` of
        ``self.am`` (its state dict's index ``i``), the fragments ``(fqn, start in the flattened
        parameter, start in the piece, numel)`` and where the piece sits (fp32 flat, offset); and
        every parameter's full shape. Saved beside
        DeepSpeed's per-rank files so a checkpoint can be reassembled per parameter without DeepSpeed's
        process layout (:func:`read_zero_full`). ``names``: id(param) -> fully qualified name."""
        pieces, where = [], []
        for p in (t for g in self.am.param_groups for t in g["params"]):
            s, t, a, _ = next(piece for piece in self._pieces if piece[1] is p)
            base = 0 if a is None else a
            pieces.append([(names[id(q)], lp, start - base, end - start) for _, start, end, q, lp in s.slices
                           if base <= start and end <= base + t.numel()])
            where.append((self._shards.index(s), base))  # the fp32 flat (DeepSpeed's order) and the offset in it
        shapes = {names[id(q)]: tuple(getattr(q, "ds_shape", q.shape)) for s in self._shards for *_, q, _ in s.slices}
        return {"pieces": pieces, "where": where, "shapes": shapes}

    @torch.no_grad()
    def load_full(self, model: dict, optim: dict, names: dict[int, str]) -> None:
        """Load whole per-parameter state (another backend's or world size's checkpoint): ``model``
        fqn -> fp32 tensor into this rank's fp32 shards; ``optim`` torch's FQN-keyed optimizer state
        dict (``{"state": {fqn: {key: tensor}}, "param_groups": [{..., "params": [fqn]}], "am_state"}``)
        cut into this rank's pieces. The bit16 copies are the caller's (:func:`load_full`)."""
        for s in self._shards:
            for _, start, end, q, lp in s.slices:
                s.flat.data[start:end].copy_(model[names[id(q)]].reshape(-1)[lp:lp + end - start])
        if optim is None:  # weights only: a fresh optimizer state
            self.zero_padding()
            return
        layout = self.layout(names)
        state = {}
        for i, (t, frags) in enumerate(zip((t for g in self.am.param_groups for t in g["params"]), layout["pieces"])):
            entry = {}
            for fqn, lp, off, n in frags:
                for key, value in optim["state"].get(fqn, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        entry.setdefault(key, torch.zeros(t.numel(), dtype=value.dtype))[off:off + n] = \
                            value.reshape(-1)[lp:lp + n]
                    else:  # a per-parameter scalar (the step count): the same for every fragment
                        entry[key] = value.clone() if torch.is_tensor(value) else value
            if entry:
                state[i] = entry
        index, groups = 0, []
        for g_am, g_saved in zip(self.am.param_groups, optim["param_groups"]):
            groups.append({**{k: v for k, v in g_saved.items() if k != "params"},
                           "params": list(range(index, index + len(g_am["params"])))})
            index += len(g_am["params"])
        self.load_state_dict({"state": state, "param_groups": groups, "am_state": optim["am_state"]})
        self.zero_padding()

    def state_dict(self) -> dict:
        # DeepSpeed's fragment linking reads `state[flat]`; on the defaultdict this plants an empty
        # entry for a tensor that per-layer `self.am` does not own (it steps views of the flat),
        # which torch's state_dict cannot map. Drop those empty foreign entries before saving.
        owned = {id(p) for g in self.am.param_groups for p in g["params"]}
        for key in [k for k, v in self.am.state.items() if id(k) not in owned and not v]:
            del self.am.state[key]
        return self.am.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.am.load_state_dict(state_dict)
        self._relink = True  # the state tensors are new


# ---------------------------------------------------------------------------------------
# Engine, optimizer access, checkpoints
# ---------------------------------------------------------------------------------------


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
        _device_side_norm_checks()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds)
    if isinstance(client, ZeroAMAdapter):
        if engine.optimizer is client:  # not expected with ZeRO > 0; keep the template path working
            raise RuntimeError("DeepSpeed did not wrap the optimizer for ZeRO stage > 0")
        client.bind(engine.optimizer)
    if cfg.train.compile:
        engine.compile()  # DeepSpeed's own: torch.compile of the module, aware of its ZeRO hooks
    return engine


def _valid_norm(norm) -> bool:
    """Stands in for DeepSpeed's ``is_invalid_grad_norm`` (see :func:`_device_side_norm_checks`)."""
    return False


def _device_side_norm_checks() -> None:
    """Remove the host read DeepSpeed's ZeRO-1/2/3 and BF16 optimizers make every step.

    They call ``is_invalid_grad_norm(norm)`` -- ``bool()`` of a device tensor, one GPU sync per step --
    to skip a step whose gradient norm is NaN/inf (whenever clipping is on or overflow checks are; in
    DeepSpeed 0.19 that is every step of every recipe). With an AM optimizer that decision is already
    taken on the device: a non-finite gradient makes its all-reduced statistics non-finite on every rank
    and it skips its update (``skip_nonfinite``). What DeepSpeed does instead when the norm is bad stays
    safe: the clip coefficient of a NaN norm is NaN, so the scaled gradients are NaN and the AM step
    skips; a -1 "invalid" sentinel leaves the (non-finite) gradients unscaled, same outcome. So the
    check answers "valid" in the modules that imported it. Process-wide; only called for AM optimizers
    (tested: tests/test_gpu_path.py, NaN gradients under ZeRO-2 skip the update)."""
    import importlib

    for name in ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
                 "deepspeed.runtime.bf16_optimizer"):
        module = importlib.import_module(name)
        if hasattr(module, "is_invalid_grad_norm"):
            module.is_invalid_grad_norm = _valid_norm


def am_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer that holds β (``last_beta``, ``fallback_count``, ``state_dict()["am_state"]``)."""
    client = engine.basic_optimizer
    return client.am if isinstance(client, ZeroAMAdapter) else client


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every param group (the schedule's value for this step)."""
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def save_checkpoint(engine, save_dir: str | os.PathLike, tag: str = "deepspeed") -> None:
    """``engine.save_checkpoint`` (every rank must call it) + this rank's ``am_layout_rank<r>.pt``.

    The model, DeepSpeed's fp32 shards and the AM optimizer's state (moments, per-group ``prev_lr``,
    and ``am_state`` = π, last β, β step, fallback count) go into DeepSpeed's per-rank files. The
    layout file says which parameter elements each piece of this rank's AM state holds, so that
    :func:`read_zero_full` can reassemble the checkpoint per parameter for another backend or world
    size. The trainer's state and the RNG streams are the checkpointer's (amllm/checkpoint.py).
    """
    import torch.distributed as dist

    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    client = engine.basic_optimizer
    if isinstance(client, ZeroAMAdapter):
        rank = dist.get_rank() if dist.is_initialized() else 0
        names = {id(p): n for n, p in engine.module.named_parameters()}
        torch.save(client.layout(names), Path(save_dir) / tag / f"am_layout_rank{rank}.pt")


def load_checkpoint(engine, load_dir: str | os.PathLike, tag: str = "deepspeed") -> None:
    """Inverse of :func:`save_checkpoint`, on the same world size and ZeRO layout."""
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {load_dir}")
    client = engine.basic_optimizer
    if isinstance(client, ZeroAMAdapter):
        client.zero_padding()


@torch.no_grad()
def load_full(engine, model: dict, optim: Optional[dict], param_names: list[list[str]]) -> None:
    """Load whole per-parameter state (another backend's or world size's checkpoint, see
    ``amllm.checkpoint.read_full``) into a built engine: ``model`` fqn -> fp32 tensor, ``optim``
    torch's FQN-keyed optimizer state dict with ``am_state`` (None: weights only, fresh optimizer);
    ``param_names``: the names of each param group of the client optimizer (``Backend.param_names``).

    ZeRO-1/2/3: this rank's fp32 shards and AM state pieces are cut out of the whole tensors
    (:meth:`ZeroAMAdapter.load_full`); the bit16 weights the forward uses follow: ZeRO-1/2 hold them
    whole on every rank (copied in), ZeRO-3 as partitions (refreshed from the fp32 shards).
    ZeRO-0 fp32: the client optimizer over the module's own parameters, loaded as in one process."""
    from amllm import checkpoint as ckpt

    client = engine.basic_optimizer
    adapter = isinstance(client, ZeroAMAdapter)
    if not adapter and engine.optimizer is not client:
        raise ConfigError(f"resuming another backend's checkpoint under DeepSpeed's {type(engine.optimizer).__name__} "
                          f"is not supported; use a ZeRO stage of 1-3, or resume it on the backend that wrote it")
    if adapter:
        client.load_full(model, optim, {id(p): n for n, p in engine.module.named_parameters()})
    if adapter and int(engine.zero_optimization_stage()) == 3:
        for s in client._shards:
            s.refresh()
    else:
        for n, p in engine.module.named_parameters():
            p.data.copy_(model[n].reshape(p.shape))
    if not adapter and optim is not None:
        client.load_state_dict(ckpt.optimizer_by_index(optim, param_names))


def read_zero_full(step_dir: str | os.PathLike, tag: str = "deepspeed", with_optimizer: bool = True) -> dict:
    """A DeepSpeed checkpoint of any ZeRO stage and world size as whole per-parameter state, in one
    process: ``{"model": {fqn: fp32}, "optim": {"state": {fqn: {key: tensor}}, "param_groups":
    [{..., "params": [fqn]}], "am_state": {...}}}`` -- the layout every backend loads
    (:meth:`ZeroAMAdapter.load_full`, torch's ``set_state_dict``).

    Weights of a non-AM optimizer: DeepSpeed's own ``zero_to_fp32`` merge. AM optimizers: the
    ``am_layout_rank<r>.pt`` files :func:`save_checkpoint` writes place every piece of each rank's fp32
    flats and AM state -- DeepSpeed's universal-checkpoint converter (``ds_to_universal``) knows only
    Adam's ``exp_avg``/``exp_avg_sq`` over one flat per param group, while AM keeps its own state and,
    per-layer, one piece per parameter fragment; and ``zero_to_fp32`` does not read ZeRO-1's
    BF16_Optimizer files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = Path(step_dir) / tag
    layouts = [torch.load(f, weights_only=True) for f in sorted(
        root.glob("am_layout_rank*.pt"), key=lambda f: int(f.stem.rsplit("rank", 1)[1]))]
    if not layouts and not with_optimizer:  # e.g. torch AdamW under ZeRO: DeepSpeed's own merge
        return {"model": {k: v.float().contiguous() for k, v in get_fp32_state_dict_from_zero_checkpoint(
            str(step_dir), tag=tag).items()}, "optim": None}
    if not layouts:
        raise ValueError(f"{root}: no am_layout_rank*.pt (a checkpoint of an older amllm, or not of an AM "
                         f"optimizer under ZeRO); it resumes only on the backend and world size that wrote it")
    shapes = {fqn: shape for layout in layouts for fqn, shape in layout["shapes"].items()}
    model = {fqn: torch.zeros(math.prod(shape)) for fqn, shape in shapes.items()}
    state: dict[str, dict] = {}
    saved_groups, am_state, group_fqns = None, None, None
    for r, layout in enumerate(layouts):
        optim_file = next(root.glob(f"*zero_pp_rank_{r}_mp_rank_*_optim_states.pt"), None)  # bf16_... under bf16
        if optim_file is None:
            raise ValueError(f"{root}: no optimizer file of rank {r} (zero_pp_rank_{r}_*_optim_states.pt)")
        osd = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")
        if not isinstance(base, dict) or "state" not in base:
            raise ValueError(f"{optim_file}: no AM optimizer state where DeepSpeed {osd.get('ds_version', '?')} "
                             f"keeps it; see docs/deepspeed_notes.md")
        flats = osd.get("single_partition_of_fp32_groups") or osd.get("fp32_flat_groups")  # ZeRO-1/2 | ZeRO-3
        for (shard, offset), frags in zip(layout["where"], layout["pieces"]):
            for fqn, lp, off, n in frags:
                model[fqn][lp:lp + n] = flats[shard][offset + off:offset + off + n].float()
        if r == 0:
            saved_groups, am_state = base["param_groups"], base.get("am_state")  # the same on every rank
            group_fqns = [set() for _ in saved_groups]
        for g, group in enumerate(base["param_groups"]):
            group_fqns[g].update(f for i in group["params"] for f, *_ in layout["pieces"][i])
        for i, frags in enumerate(layout["pieces"]):
            for key, value in base["state"].get(i, {}).items():
                for fqn, lp, off, n in frags:
                    entry = state.setdefault(fqn, {})
                    if torch.is_tensor(value) and value.dim() > 0:
                        full = entry.setdefault(key, torch.zeros(model[fqn].numel(), dtype=value.dtype))
                        full[lp:lp + n] = value[off:off + n]
                    else:  # a per-parameter scalar (the step count): a tensor of its own per parameter
                        entry[key] = value.clone() if torch.is_tensor(value) else value
    model = {fqn: t.view(shapes[fqn]) for fqn, t in model.items()}
    for fqn, entry in state.items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                entry[key] = value.view(model[fqn].shape)
    if not with_optimizer:
        return {"model": model, "optim": None}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [f for f in model if f in fqns]}
              for g, fqns in zip(saved_groups, group_fqns)]
    return {"model": model, "optim": {"state": state, "param_groups": groups, "am_state": am_state}}
