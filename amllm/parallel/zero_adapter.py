"""The client optimizer DeepSpeed ZeRO sees, which makes AM's β exact, and the AM layout of its checkpoints.

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
shard into views, one per parameter fragment (located by deepspeed_compat.zero_view), each view
one layer of ``set_layer_map`` (padding belongs to no view).

Checkpoints: beside DeepSpeed's per-rank files, ``am_layout_rank<r>.pt`` says which parameter elements
each piece of this rank's AM state holds (:meth:`ZeroAMAdapter.layout`), so that :func:`read_zero_full`
reassembles any ZeRO checkpoint per parameter for another backend or world size and
:meth:`ZeroAMAdapter.load_full` cuts whole per-parameter state back into pieces.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from ..optim._base import AMOptimizerBase
from .deepspeed_compat import Shard, full_shape, rank_optimizer_state, relink_fragment_states, zero_view


def _layer_ids(am: AMOptimizerBase) -> tuple[dict[int, int], int]:
    """id(param) -> β layer, as the AM optimizer numbers its own layers (global: all 0; per_layer:
    per tensor, or per group with ``layer_per_group``), so that ``last_beta[k]`` means the same
    layer as in a single-process run. Every rank gets the same numbering."""
    layers, n_layers = am._layers()
    return {id(p): layer for p, layer in layers.items()}, n_layers


def _reduce_group(dp_group, shards: list[Shard]):
    """The group AM's packed sums are all-reduced over: DeepSpeed's data-parallel group, unless the
    shards live where that group has no backend. Under optimizer offload the fp32 shards, the AM
    state and the sums are CPU tensors, and NCCL serves CUDA tensors only: then a gloo group over
    the same ranks is built here (bind runs on every rank, so every rank joins) and the CPU sums
    are reduced there, with no device copy and no host sync. One rank: no reduction at all."""
    import torch.distributed as dist

    from ..optim.reduce import group_serves

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


# ---- whole per-parameter state <-> this rank's pieces: one rule, both directions -------------------------

def _elementwise(value) -> bool:
    """A per-element state tensor (moments), cut into fragments; anything else (the step count) is one
    value per parameter, the same for every fragment of it."""
    return torch.is_tensor(value) and value.dim() > 0


def _piece_state(frags: list, full: dict[str, dict], numel: int) -> dict:
    """One piece's optimizer state entry from whole per-parameter state ``full`` (fqn -> {key: tensor})."""
    entry = {}
    for fqn, lp, off, n in frags:
        for key, value in full.get(fqn, {}).items():
            if _elementwise(value):
                entry.setdefault(key, torch.zeros(numel, dtype=value.dtype))[off:off + n] = value.reshape(-1)[lp:lp + n]
            else:
                entry[key] = value.clone() if torch.is_tensor(value) else value
    return entry


def _add_piece_state(frags: list, piece: dict, full: dict[str, dict], numel_of: dict[str, int]) -> None:
    """The inverse of :func:`_piece_state`: one piece's entry written into whole per-parameter state."""
    for key, value in piece.items():
        for fqn, lp, off, n in frags:
            entry = full.setdefault(fqn, {})
            if _elementwise(value):
                entry.setdefault(key, torch.zeros(numel_of[fqn], dtype=value.dtype))[lp:lp + n] = value[off:off + n]
            else:
                entry[key] = value.clone() if torch.is_tensor(value) else value


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
        self._shards: list[Shard] = []
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
        layer_of, n_layers = _layer_ids(self.template)
        view = zero_view(ds_opt, layer_of)
        shards = view.shards
        if len({id(g) for g in view.dp_groups}) != 1:
            raise ConfigError("AM-AdamW under DeepSpeed needs one data-parallel group for all param groups "
                              "(MoE/expert groups are not supported); remove the expert param groups")
        if view.offload and len(shards) > 1:
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
        self.am = type(self.template)(inner_groups, reducer=_reduce_group(view.dp_groups[0], shards),
                                      **self.template.defaults)
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

    def refresh_bit16(self) -> None:
        """Copy every shard's fp32 into the bit16 copy the forward uses (where DeepSpeed keeps one per shard)."""
        for s in self._shards:
            if s.refresh is not None:
                s.refresh()

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
        if self._relink:
            relink_fragment_states(self._ds_opt)
            self._relink = False
        return None

    # -- a checkpoint layout any backend can read ---------------------------------------------
    def layout(self, names: dict[int, str]) -> dict:
        """Where each element of this rank's AM state lives in the model: for piece ``i`` of
        ``self.am`` (its state dict's index ``i``), the fragments ``(fqn, start in the flattened
        parameter, start in the piece, numel)`` and where the piece sits (fp32 flat, offset); and
        every parameter's full shape. Saved beside DeepSpeed's per-rank files (:func:`save_layout`).
        ``names``: id(param) -> fully qualified name."""
        pieces, where = [], []
        for p in (t for g in self.am.param_groups for t in g["params"]):
            s, t, a, _ = next(piece for piece in self._pieces if piece[1] is p)
            base = 0 if a is None else a
            pieces.append([(names[id(q)], lp, start - base, end - start) for _, start, end, q, lp in s.slices
                           if base <= start and end <= base + t.numel()])
            where.append((self._shards.index(s), base))  # the fp32 flat (DeepSpeed's order) and the offset in it
        shapes = {names[id(q)]: full_shape(q) for s in self._shards for *_, q, _ in s.slices}
        return {"pieces": pieces, "where": where, "shapes": shapes}

    @torch.no_grad()
    def load_full(self, model: dict, optim: Optional[dict], names: dict[int, str]) -> None:
        """Load whole per-parameter state (another backend's or world size's checkpoint): ``model``
        fqn -> fp32 tensor into this rank's fp32 shards; ``optim`` torch's FQN-keyed optimizer state
        dict (``{"state": {fqn: {key: tensor}}, "param_groups": [{..., "params": [fqn]}], "am_state"}``)
        cut into this rank's pieces, or None (a fresh optimizer state). The bit16 copies are the
        caller's (``deepspeed_backend.DeepSpeedBackend.load_full``)."""
        for s in self._shards:
            for _, start, end, q, lp in s.slices:
                s.flat.data[start:end].copy_(model[names[id(q)]].reshape(-1)[lp:lp + end - start])
        if optim is None:
            self.zero_padding()
            return
        layout = self.layout(names)
        tensors = [t for g in self.am.param_groups for t in g["params"]]
        state = {i: entry for i, (t, frags) in enumerate(zip(tensors, layout["pieces"]))
                 if (entry := _piece_state(frags, optim["state"], t.numel()))}
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


def save_layout(adapter: ZeroAMAdapter, module: torch.nn.Module, root: Path, rank: int) -> None:
    """This rank's ``am_layout_rank<r>.pt`` under ``root`` (= step-N/deepspeed)."""
    names = {id(p): n for n, p in module.named_parameters()}
    torch.save(adapter.layout(names), Path(root) / f"am_layout_rank{rank}.pt")


def read_zero_full(step_dir: str | Path, tag: str = "deepspeed", with_optimizer: bool = True) -> dict:
    """A DeepSpeed checkpoint of any ZeRO stage and world size as whole per-parameter state, in one
    process: ``{"model": {fqn: fp32}, "optim": {"state": {fqn: {key: tensor}}, "param_groups":
    [{..., "params": [fqn]}], "am_state": {...}}}`` -- the layout every backend loads
    (:meth:`ZeroAMAdapter.load_full`, torch's ``set_state_dict``).

    Weights of a non-AM optimizer: DeepSpeed's own ``zero_to_fp32`` merge. AM optimizers: the
    ``am_layout_rank<r>.pt`` files :func:`save_layout` writes place every piece of each rank's fp32
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
    numel_of = {fqn: math.prod(shape) for fqn, shape in shapes.items()}
    model = {fqn: torch.zeros(n) for fqn, n in numel_of.items()}
    state: dict[str, dict] = {}
    saved_groups, am_state, group_fqns = None, None, None
    for r, layout in enumerate(layouts):
        base, flats = rank_optimizer_state(root, r)
        for (shard, offset), frags in zip(layout["where"], layout["pieces"]):
            for fqn, lp, off, n in frags:
                model[fqn][lp:lp + n] = flats[shard][offset + off:offset + off + n].float()
        if r == 0:
            saved_groups, am_state = base["param_groups"], base.get("am_state")  # the same on every rank
            group_fqns = [set() for _ in saved_groups]
        for g, group in enumerate(base["param_groups"]):
            group_fqns[g].update(f for i in group["params"] for f, *_ in layout["pieces"][i])
        for i, frags in enumerate(layout["pieces"]):
            _add_piece_state(frags, base["state"].get(i, {}), state, numel_of)
    model = {fqn: t.view(shapes[fqn]) for fqn, t in model.items()}
    for fqn, entry in state.items():
        for key, value in entry.items():
            if _elementwise(value):
                entry[key] = value.view(model[fqn].shape)
    if not with_optimizer:
        return {"model": model, "optim": None}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [f for f in model if f in fqns]}
              for g, fqns in zip(saved_groups, group_fqns)]
    return {"model": model, "optim": {"state": state, "param_groups": groups, "am_state": am_state}}
