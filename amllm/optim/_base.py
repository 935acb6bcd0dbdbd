"""Bookkeeping shared by AMAdamW and AMSGD: validation, layers, β state, checkpoints.

The update math lives in ``functional.py``; this module only turns torch's
``Optimizer`` structures (param groups, per-param state) into the functional inputs.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import rounding
from .beta import POLICIES, BetaConfig, BetaState
from .functional import lr_ratio
from .reduce import is_dtensor, local, resolve_reducer

# β hyper-parameters are properties of the shared β, hence optimizer-wide.
_BETA_KEYS = ("beta_policy", "beta_min", "restart_threshold", "restart_low", "per_layer")
_AM_STATE_KEYS = ("pi", "last_beta", "beta_step", "fallback_count")
#: Per-parameter moments, kept in ``state_dtype`` (see ``AMOptimizerBase.state_dtype_for``).
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")
_LOWP = (torch.bfloat16, torch.float16)
STATE_DTYPES = ("fp32", "param")


#: ``torch.compile(opt.step)`` runs the eager step: Dynamo would trace the host-side
#: bookkeeping (β state, layer map, group dicts) into a graph that does not write it back
#: (silently wrong results); the kernels the step calls are already fused.
eager_step = torch._dynamo.disable(
    recursive=True,
    reason="amllm optimizers run their step eagerly under torch.compile (see docs/optimizer.md)")


#: Attributes kept by pickling/deepcopy besides torch's, with the value for older pickles.
_PICKLED = {"_impl": "auto", "reducer": None, "_beta_state": None, "_explicit_layers": None,
            "_force_beta": None, "found_inf": None, "skip_nonfinite": False, "_last_skipped": None,
            # pickles from before low-precision options: their behaviour (state in the param dtype, no SR)
            "state_dtype": "param", "stochastic_rounding": False, "sr_seed": 0, "_sr_step": 0}


def _is_process_group(reducer) -> bool:
    # torch.distributed only when it is already imported: a ProcessGroup implies it is.
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and isinstance(reducer, dist.ProcessGroup)


def refuse(opt: str, name: str, value, default, why: str) -> None:
    """A torch.optim keyword accepted for signature compatibility, at its default only."""
    if value != default:
        raise ValueError(f"{opt} does not support {name}={value!r}: {why}")


def signed_grads(grads: list, group: dict) -> list:
    """The gradients a step uses: negated copies for ``maximize`` (ascent on f is descent on
    -f, including the β solve), else the gradients themselves."""
    return torch._foreach_neg(grads) if group["maximize"] and grads else grads


def _beta_max_message(values: list) -> str:
    return (f"beta_max is optimizer-wide (all groups share the β), but param groups have {values}; "
            f"a momentum scheduler (OneCycleLR/CyclicLR cycle_momentum=True) must give every group "
            f"the same max_momentum/base_momentum")


def _kind_of(sd: dict) -> str:
    """Which optimizer saved a dict without ``am_optimizer`` (older AM dicts, torch's):
    AM groups carry ``lam``; AdamW-like groups ``betas``, SGD-like ``momentum``."""
    groups = sd.get("param_groups") or [{}]
    am = "lam" in groups[0]
    if "betas" in groups[0]:
        return "AMAdamW" if am else "torch AdamW"
    if "momentum" in groups[0] or "beta_max" in groups[0]:
        return "AMSGD" if am else "torch SGD"
    return "unknown optimizer's"


#: Why a state dict of another optimizer is refused (the ``(saved, loading)`` pair).
_WHY = {
    ("torch SGD", "AMSGD"): "torch SGD's momentum_buffer is β·d + g, AM-SGD's d is the convex "
                            "combination ((β+λ)d + (1-β)g)/(1+λ)",
    ("AMAdamW", "AMSGD"): "optimizer type differs (AM-SGD has no v, and its d and β state follow another rule)",
    ("AMSGD", "AMAdamW"): "optimizer type differs (AM-SGD has no v, and its d and β state follow another rule)",
    ("torch SGD", "AMAdamW"): "optimizer type differs (SGD has no second moment v)",
    ("torch AdamW", "AMSGD"): "optimizer type differs (AdamW's moments are not AM-SGD's d)",
}


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value} (must be {rule})")


def validate_common(lr, beta_max, lam, weight_decay) -> None:
    _check(lr >= 0.0, "learning rate", lr, ">= 0")
    _check(0.0 <= beta_max < 1.0, "beta_max", beta_max, "in [0, 1)")
    _check(lam >= 0.0, "lam", lam, ">= 0")
    _check(weight_decay >= 0.0, "weight_decay", weight_decay, ">= 0")


def validate_lowp_options(state_dtype, stochastic_rounding, sr_seed) -> None:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (must be one of {STATE_DTYPES})")
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"Invalid stochastic_rounding: {stochastic_rounding!r} (must be True or False)")
    if isinstance(sr_seed, bool) or not isinstance(sr_seed, int) or sr_seed < 0:
        raise ValueError(f"Invalid sr_seed: {sr_seed!r} (must be an int >= 0)")


def validate_beta_options(beta_policy, beta_min, restart_threshold, restart_low) -> None:
    if beta_policy not in POLICIES:
        raise ValueError(f"Invalid beta_policy: {beta_policy!r} (must be one of {POLICIES})")
    _check(0.0 <= beta_min <= 1.0, "beta_min", beta_min, "in [0, 1]")
    _check(0.0 <= restart_threshold <= 1.0, "restart_threshold", restart_threshold, "in [0, 1]")
    _check(0.0 <= restart_low <= 1.0, "restart_low", restart_low, "in [0, 1]")


class AMOptimizerBase(Optimizer):
    """Shared machinery. Subclasses define ``_name``, ``_beta_max(group)``,
    ``_validate_group(group)`` and ``step``.

    Layers (which elements share a β): global variant, one layer. ``per_layer=True``:
    one layer per parameter tensor, except that a param group with
    ``layer_per_group=True`` is one layer as a whole (e.g. one group per transformer
    block). :meth:`set_layer_map` overrides both (flat-shard hook).
    """

    _name = "AMOptimizer"

    #: ``impl="auto"`` picks the fused kernels from this many elements on (fewer: foreach,
    #: whose speed does not matter there and which needs no build or compile time).
    _FUSED_MIN_NUMEL = 1 << 20

    #: The ``impl`` values this optimizer accepts: "auto" and functional's names (subclasses).
    IMPLS: tuple = ("auto",)
    #: what pickling/deepcopy keeps besides torch's fields (a subclass extends it with its own)
    _PICKLED: dict = _PICKLED

    def __init__(self, params, defaults: dict, reducer=None, foreach: Optional[bool] = None,
                 fused: Optional[bool] = None, skip_nonfinite: bool = False, impl: Optional[str] = None,
                 state_dtype: str = "fp32", stochastic_rounding: bool = True, sr_seed: int = 0):
        validate_beta_options(*(defaults[k] for k in _BETA_KEYS[:4]))
        validate_lowp_options(state_dtype, stochastic_rounding, sr_seed)
        #: Low-precision parameters (see "Low-precision parameters" in docs/optimizer.md):
        #: ``state_dtype`` "fp32" keeps the moments of bf16/fp16 parameters in float32 ("param":
        #: in the parameter dtype, as torch AdamW); ``stochastic_rounding`` writes bf16
        #: parameters back with SR keyed by (``sr_seed``, the SR step counter, tensor index).
        self.state_dtype = state_dtype
        self.stochastic_rounding = stochastic_rounding
        self.sr_seed = sr_seed
        self._sr_step = 0  # steps taken (skipped ones too): the counter of the SR keys, checkpointed
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r} (must be None, True or False)")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (must be None, True or False)")
        if fused and foreach is not None:
            raise ValueError("fused=True and foreach cannot both be given")
        if impl is not None and (foreach is not None or fused is not None):
            raise ValueError(f"impl={impl!r} and foreach/fused cannot both be given (impl names the path itself)")
        #: The kernel path (``impl``, see the property): the keyword, else torch's foreach/fused.
        self._impl = self._valid_impl(impl) if impl is not None else (
            "fused" if fused else "forloop" if foreach is False else "foreach" if foreach or fused is False else "auto")
        self.reducer = reducer
        self._reset_caches()
        self._beta_state: Optional[BetaState] = None
        self._explicit_layers: Optional[tuple[dict, int]] = None
        #: Test-only hook: when not None, every β is forced to this value (after the
        #: policy; π and the state follow it). Not a user option.
        self._force_beta: Optional[float] = None
        #: ``last_sums``: the packed sums of the last step after reduction, ``[L, K+1]``
        #: (for logging; set by ``_reset_caches``).
        #: Skip protocol (as GradScaler's): a 0-d tensor set by the caller before ``step()``;
        #: nonzero skips the whole step (params, moments, step counts, β state unchanged;
        #: the reducer is still called once). None: no flag.
        self.found_inf: Optional[Tensor] = None
        #: Also skip when the all-reduced sums are not all finite (a NaN/inf gradient on any
        #: rank), decided identically on every rank without another collective.
        self.skip_nonfinite = bool(skip_nonfinite)
        self._last_skipped: Optional[Tensor] = None
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        """Derived per-process values, rebuilt on demand (also after unpickling)."""
        self._reduce_resolved = False
        self._reduce_fn = None
        self._plain_weight = 1.0
        self._layer_cache = None
        self._not_skipped: dict = {}  # device -> a constant False (steps that could not skip)
        self.last_sums: Optional[Tensor] = None

    # -- param groups ---------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        self._upgrade_group(group)
        params = group["params"]
        # a generator is consumed here: hand torch the list
        group["params"] = params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            p = p[1] if isinstance(p, tuple) else p  # torch accepts named_parameters()
            if torch.is_complex(p):
                raise ValueError(f"{self._name} does not support complex parameters (got {p.dtype})")
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        group.setdefault("layer_per_group", False)
        group.setdefault("prev_lr", None)
        for k in _BETA_KEYS:
            if group[k] != self.defaults[k]:
                raise ValueError(
                    f"{k} is optimizer-wide (all groups share the β): a param group has "
                    f"{group[k]!r}, the optimizer {self.defaults[k]!r}"
                )
        if self._beta_max(group) != self._beta_max(self.defaults):
            raise ValueError(_beta_max_message([self._beta_max(self.defaults), self._beta_max(group)]))
        if not isinstance(group["layer_per_group"], bool):
            raise ValueError(f"Invalid layer_per_group: {group['layer_per_group']!r} (must be a bool)")
        self._validate_group(group)
        super().add_param_group(group)
        self._layer_cache = None

    def __getstate__(self) -> dict:
        """torch's fields plus what a step needs (kernel path, β state, explicit layer map,
        skip settings, reducer); caches are rebuilt after loading. Hooks are dropped, as
        torch's optimizers drop them."""
        if _is_process_group(self.reducer):
            raise TypeError(
                f"{self._name} with a ProcessGroup reducer cannot be pickled or deep-copied (a process "
                f"group belongs to its process): save state_dict() and build the optimizer again")
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED})
        return state

    def __setstate__(self, state: dict) -> None:
        # torch's load_state_dict calls this too, with only state and param_groups.
        super().__setstate__(state)
        # torch adds this for its own optimizers; ours refuse the option (not a group key)
        self.defaults.pop("differentiable", None)
        for k, v in self._PICKLED.items():  # pickles from before a field existed
            self.__dict__.setdefault(k, v)
        self._reset_caches()
        for group in self.param_groups:  # dicts saved before these keys existed
            self._upgrade_group(group)
            for k, v in self.defaults.items():
                group.setdefault(k, v)
            group.setdefault("layer_per_group", False)
            group.setdefault("prev_lr", None)

    def _upgrade_group(self, group: dict) -> None:
        """Rename keys of older group dicts in place (subclasses)."""

    # -- low-precision parameters ---------------------------------------------------------
    def state_dtype_for(self, p: Tensor) -> torch.dtype:
        """The dtype of ``p``'s moments: float32 for a bf16/fp16 parameter under
        ``state_dtype="fp32"``, else the parameter's own."""
        dtype = local(p).dtype
        return torch.float32 if self.state_dtype == "fp32" and dtype in _LOWP else dtype

    def _new_moment(self, p: Tensor) -> Tensor:
        return torch.zeros_like(p, dtype=self.state_dtype_for(p), memory_format=torch.preserve_format)

    def _next_sr_step(self) -> int:
        """This step's value of the SR counter (host integer; counts every ``step()`` call)."""
        step = self._sr_step
        self._sr_step += 1
        return step

    def _sr_key(self, p: Tensor, sr_step: int, index: int) -> Optional[int]:
        """The SR key of parameter number ``index`` (over all groups) on this step; None: round
        to nearest (SR off, or not a bf16 parameter)."""
        if not self.stochastic_rounding or local(p).dtype != torch.bfloat16:
            return None
        return rounding.tensor_key(self.sr_seed, sr_step, index)

    def _restore_moments(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` casts every floating state tensor to its parameter's dtype,
        which would round float32 moments of bf16 parameters to bf16: take them again from the
        saved dict, in ``state_dtype_for`` (an older bf16 state is upcast exactly)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for sid, p in zip(saved_ids, params):
            saved, st = state_dict["state"].get(sid), self.state.get(p)
            if not saved or not st or self.state_dtype_for(p) == local(p).dtype:
                continue
            for k in _MOMENT_KEYS:
                if isinstance(saved.get(k), Tensor) and k in st:
                    st[k] = saved[k].to(device=st[k].device, dtype=self.state_dtype_for(p), copy=True)

    def _beta_max(self, group: dict) -> float:
        raise NotImplementedError

    def _validate_group(self, group: dict) -> None:
        raise NotImplementedError

    def _current_beta_max(self) -> float:
        """β_max of this step: the groups' value, which a momentum scheduler may change
        (OneCycleLR/CyclicLR ``cycle_momentum``), equal in all groups (the β is shared)."""
        values = [self._beta_max(g) for g in self.param_groups] or [self._beta_max(self.defaults)]
        if any(v != values[0] for v in values):
            raise ValueError(_beta_max_message(values))
        return values[0]

    def _beta_config(self) -> BetaConfig:
        d = self.defaults
        return BetaConfig(self._current_beta_max(), d["beta_policy"], d["beta_min"], d["restart_threshold"],
                          d["restart_low"])

    # -- layers ---------------------------------------------------------------------
    def set_layer_map(self, mapping: dict, n_layers: int) -> None:
        """Flat-shard hook: assign elements to ``n_layers`` β's explicitly.

        ``mapping[param]`` is an int (the whole tensor is one layer), an int64 tensor of
        ``param.numel()`` layer ids (element-wise; the value ``n_layers`` marks padding
        that belongs to no layer), or a list of ``(layer, start, end)`` slices of the
        flattened (local) tensor; elements outside every slice are padding. Every rank
        must use the same global layer numbering so that the packed sums line up in the
        all-reduce. Parameters not in ``mapping`` must not receive gradients.
        Requires ``per_layer=True``.
        """
        if not self.defaults["per_layer"]:
            raise ValueError("set_layer_map needs per_layer=True")
        resolved = {}
        for p, spec in mapping.items():
            n = local(p).numel()
            if isinstance(spec, list):
                ids = torch.full((n,), n_layers, dtype=torch.int64)
                for layer, start, end in spec:
                    ids[start:end] = layer
                spec = ids
            if isinstance(spec, Tensor):
                spec = spec.to(device=local(p).device, dtype=torch.int64).reshape(-1)
                if spec.numel() != n:
                    raise ValueError(f"layer map has {spec.numel()} entries for a tensor of {n} elements")
            resolved[p] = spec
        self._explicit_layers = (resolved, n_layers)
        self._layer_cache = None

    def _layers(self) -> tuple[dict, int]:
        """``({param: layer}, n_layers)``, cached until groups or the map change."""
        if self._explicit_layers is not None:
            return self._explicit_layers
        if self._layer_cache is None:
            out, n = {}, 0
            for group in self.param_groups:
                if not self.defaults["per_layer"]:
                    out.update((p, 0) for p in group["params"])
                    n = 1
                elif group["layer_per_group"]:
                    out.update((p, n) for p in group["params"])
                    n += 1
                else:
                    for p in group["params"]:
                        out[p] = n
                        n += 1
            self._layer_cache = (out, max(n, 1))
        return self._layer_cache

    # -- β state --------------------------------------------------------------------
    def _stats_device_dtype(self):
        params = [local(p) for g in self.param_groups for p in g["params"]]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        return params[0].device, dtype

    def _get_beta_state(self) -> BetaState:
        n_layers = self._layers()[1]
        if self._beta_state is None:
            device, dtype = self._stats_device_dtype()
            self._beta_state = BetaState.fresh(n_layers, self._current_beta_max(), device, dtype)
        self._beta_state = self._beta_state.resized(n_layers, self._current_beta_max())
        return self._beta_state

    def _reducer(self):
        if not self._reduce_resolved:
            params = [p for g in self.param_groups for p in g["params"]]
            self._reduce_fn, self._plain_weight = resolve_reducer(self.reducer, params)
            self._reduce_resolved = True
        return self._reduce_fn

    def _weight(self, p: Tensor) -> float:
        """Multiplier of a tensor's partial sums (plain tensors under a mesh reduction)."""
        return 1.0 if is_dtensor(p) else self._plain_weight

    def _valid_impl(self, impl) -> str:
        if not isinstance(impl, str) or impl not in self.IMPLS:
            raise ValueError(f"Invalid impl: {impl!r} (must be one of {self.IMPLS})")
        return impl

    @property
    def impl(self) -> str:
        """The kernel path of every step (``impl=`` keyword; settable, validated): ``"auto"``
        (resolved per step, see ``_resolved_impl``), ``"forloop"``, ``"foreach"``, ``"fused"``
        (the C++ kernels on CPU, the Triton kernels on CUDA), or one fused path by name:
        ``"cpp"``, ``"compiled"`` (AMAdamW only), ``"triton"``. Kept by pickling and deepcopy,
        not by ``state_dict()``: it is how this process runs the step, not training state (a
        checkpoint written on one device resumes with the path chosen on another)."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        self._impl = self._valid_impl(value)

    def _resolved_impl(self) -> str:
        """The kernel path of this step: ``auto`` becomes ``fused`` on an accelerator (the
        Triton kernels: 3 launches per group, no host read, whatever the size) and, on the
        CPU, for models of at least ``_FUSED_MIN_NUMEL`` elements (below that, ``foreach``:
        no build time for tiny models). (What ``fused`` runs on each device, with its
        fallbacks, is decided per bucket in ``functional._buckets``.)"""
        if self._impl != "auto":
            return self._impl
        params = [local(p) for g in self.param_groups for p in g["params"]]
        if any(p.device.type != "cpu" for p in params):
            return "fused"
        return "fused" if sum(p.numel() for p in params) >= self._FUSED_MIN_NUMEL else "foreach"

    def _take_lr_ratio(self, group: dict) -> float:
        """r for this step; remembers this step's lr for the next one."""
        r = lr_ratio(group.get("prev_lr"), group["lr"])
        group["prev_lr"] = group["lr"]
        return r

    def _record_skip(self, skip: Optional[Tensor], steps: list[Tensor]) -> None:
        """After a step: count it in every step counter unless skipped (one foreach op, no
        host read), and set ``last_skipped``."""
        if steps and skip is None:
            torch._foreach_add_(steps, 1.0)
        elif steps:  # a list of one 0-d tensor: the Tensor-scalar overload reads it on the host on CPU
            keep = skip.logical_not().to(steps[0].device, torch.float32)
            torch._foreach_add_(steps, [keep] * len(steps))
        if skip is None:
            device = self._get_beta_state().pi.device
            if device not in self._not_skipped:
                self._not_skipped[device] = torch.zeros((), dtype=torch.bool, device=device)
            skip = self._not_skipped[device]
        self._last_skipped = skip

    @property
    def last_skipped(self) -> Tensor:
        """0-d bool tensor on device: whether the last step was skipped (False before any).
        Accumulate it on device (``n_skipped += opt.last_skipped``); reading it is a sync."""
        if self._last_skipped is None:
            return torch.zeros((), dtype=torch.bool, device=self._get_beta_state().pi.device)
        return self._last_skipped

    def _step_device(self, p: Tensor) -> torch.device:
        """Where ``state["step"]`` lives: the (local) parameter's device, as torch's
        fused/capturable AdamW. The kernels read it there (Triton: in the kernel; the other
        paths: one stacked vector per bucket), so a step never reads a counter on the host."""
        return local(p).device

    @property
    def last_beta(self) -> Tensor:
        """β used on the last step: 0-d (global) or ``[n_layers]`` (per_layer), on device."""
        beta = self._get_beta_state().last_beta
        return beta if self.defaults["per_layer"] else beta[0]

    def layer_of(self, param: Tensor) -> int:
        """The index of the β ``param`` uses (its entry in ``last_beta``)."""
        layers = self._layers()[0]
        if param not in layers:
            raise KeyError(f"parameter of shape {tuple(param.shape)} is not in this {self._name}")
        if isinstance(layers[param], Tensor):
            raise ValueError("this parameter's elements belong to several layers (set_layer_map)")
        return layers[param]

    def beta_by_layer(self, names=None) -> dict:
        """The β of the last step per layer, as Python floats (one host read).

        Keys: the group's ``"name"`` for a ``layer_per_group`` group that has one; for a
        one-tensor layer, its parameter name from ``names`` (``model.named_parameters()``
        or a ``{param: name}`` map) or from torch's ``param_names`` (an optimizer built
        from ``named_parameters()``); else the layer index (global β: ``{0: β}``)."""
        betas = self._get_beta_state().last_beta.tolist()
        if names is None:
            names = {p: n for g in self.param_groups for p, n in zip(g["params"], g.get("param_names", ()))}
        elif not isinstance(names, dict):
            names = {p: n for n, p in names}
        keys = {}
        if self.defaults["per_layer"] and self._explicit_layers is None:
            layers = self._layers()[0]
            for g in self.param_groups:
                for p in g["params"]:
                    key = g.get("name") if g["layer_per_group"] else names.get(p)
                    if key is not None:
                        keys[layers[p]] = key
        return {keys.get(i, i): b for i, b in enumerate(betas)}

    @property
    def fallback_count(self) -> Tensor:
        """0-d int64 tensor: steps (per_layer: layer-steps) that hit the C <= 0 fallback."""
        return self._get_beta_state().fallback_count

    @property
    def beta_state(self) -> BetaState:
        return self._get_beta_state()

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's dict plus ``"am_state"``: {pi, last_beta, beta_step, fallback_count, sr_step}, and
        ``"am_optimizer"``: the class name (tells a foreign dict from ours on load).

        All entries are tensors or Python scalars/strings (``torch.load(weights_only=True)``
        works). The previous lr lives in each param group as ``"prev_lr"``.
        """
        sd = super().state_dict()
        sd["am_state"] = {k: v.detach().clone() for k, v in self._get_beta_state().to_dict().items()}
        sd["am_state"]["sr_step"] = torch.tensor(self._sr_step, dtype=torch.int64)
        sd["am_optimizer"] = self._name
        return sd

    def _check_layout(self, sd: dict, am: Optional[dict]) -> None:
        """One of our dicts: refuse another β layout before anything is loaded (it would
        half-load and fail a step later)."""
        groups = sd.get("param_groups") or [{}]
        saved = groups[0].get("per_layer", False)
        if saved != self.defaults["per_layer"]:
            raise ValueError(f"cannot load a {self._name} state dict with per_layer={saved} into one with "
                             f"per_layer={self.defaults['per_layer']}: the β layouts differ")
        n = self._layers()[1]
        if am is not None and "pi" in am and am["pi"].numel() != n:
            raise ValueError(f"cannot load a {self._name} state dict with {am['pi'].numel()} β layers into one "
                             f"with {n}: the param groups or the layer map differ")

    def _from_adamw(self, sd: dict) -> dict:
        """torch AdamW's dict as ours: moments kept as d and v, our groups' settings."""
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(f"cannot load a torch AdamW state dict with {len(sd['param_groups'])} param groups "
                             f"into {self._name} with {len(self.param_groups)}")
        groups = [{**{k: v for k, v in ours.items() if k != "params"}, "params": saved["params"]}
                  for ours, saved in zip(self.param_groups, sd["param_groups"])]
        state = {i: {k: st[k] for k in ("step", "exp_avg", "exp_avg_sq") if k in st}
                 for i, st in sd["state"].items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads this optimizer's dicts (older ones too), torch AdamW's into AMAdamW, and
        refuses the rest with a one-line error; see "Checkpoints" in docs/optimizer.md."""
        state_dict = dict(state_dict)
        am = state_dict.pop("am_state", None)
        kind = state_dict.pop("am_optimizer", None) or _kind_of(state_dict)
        note = None
        if kind == "torch AdamW" and self._name == "AMAdamW":
            state_dict = self._from_adamw(state_dict)
            am, note = None, ("loaded a torch AdamW state dict into AMAdamW: exp_avg/exp_avg_sq become d and v, "
                              "the β state starts fresh, AdamW-only group keys are dropped and this "
                              "optimizer's hyper-parameters are kept")
        elif kind != self._name:
            why = _WHY.get((kind, self._name), "the per-parameter state means something else")
            raise ValueError(f"cannot load a {kind} state dict into {self._name}: {why}")
        else:
            self._check_layout(state_dict, am)
            if am is None:
                note = (f"{self._name} state dict without am_state (saved by an older version): "
                        f"the β state starts fresh (first-step rule, π = 1)")
        super().load_state_dict(state_dict)
        self._restore_moments(state_dict)
        if note:
            warnings.warn(note, UserWarning, stacklevel=2)
        fresh = BetaState.fresh(self._layers()[1], self._current_beta_max(),
                                *self._stats_device_dtype())
        am = dict(am or {})
        sr_step = am.pop("sr_step", None)  # absent in dicts saved before stochastic rounding: 0
        self._sr_step = 0 if sr_step is None else int(sr_step)
        for k in _AM_STATE_KEYS:
            am.setdefault(k, getattr(fresh, k))
        ref = fresh.to_dict()
        self._beta_state = BetaState(**{k: am[k].to(device=ref[k].device, dtype=ref[k].dtype) for k in _AM_STATE_KEYS})
        # torch leaves "step" where the checkpoint had it (e.g. on a GPU after map_location,
        # with params elsewhere): put every counter where this optimizer keeps it.
        for p, st in self.state.items():
            if isinstance(st.get("step"), Tensor):
                st["step"] = st["step"].to(device=self._step_device(p), dtype=torch.float32)
