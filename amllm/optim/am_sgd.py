"""AM-SGD: heavy-ball SGD whose momentum coefficient β is solved for every step."""

from __future__ import annotations

from typing import Optional

import torch

from ._base import AMOptimizerBase, eager_step, refuse, signed_grads, validate_common
from .functional import SGD_IMPLS, SGDGroup, am_sgd
from .reduce import local


_MOMENTUM_DEFAULT = 0.9  # AMSGD's default `momentum` (its signature's)


def _beta_max_of(momentum: float, beta_max: Optional[float]) -> float:
    """β_max from ``momentum`` (torch SGD's name, which momentum schedulers read) and its alias
    ``beta_max`` (the name before ``momentum``). The alias wins over a ``momentum`` at the default:
    an explicit 0.9 cannot be told from the default, so ``momentum=0.9, beta_max=0.5`` is 0.5. Two
    explicit values that differ are refused: neither can be taken silently."""
    if beta_max is None:
        return momentum
    if momentum != _MOMENTUM_DEFAULT and momentum != beta_max:
        raise ValueError(f"momentum={momentum} and beta_max={beta_max} disagree: both set AM-SGD's β_max "
                         f"(beta_max= is an alias of momentum=); pass only one of them, preferably momentum= "
                         f"(torch SGD's name, which momentum schedulers read)")
    return beta_max


class AMSGD(AMOptimizerBase):
    r"""AM-SGD (the paper's AM-MSGD, Algorithm 1, stochastic line 5).

    From "Adaptive Memory Momentum via a Model-Based Framework for Deep Learning
    Optimization", Topollai & Choromanska, arXiv 2510.04988. Contract:
    ``docs/optimizer.md``. With g ← g + μ x (coupled weight decay, as
    ``torch.optim.SGD``)::

        first step of a tensor (no buffer):  d ← g;  x ← x - η_t d
        every later step:
          r   = η_{t-1} / η_t                 (1 when η_t = 0)
          δ   = d - g
          num = (λ+1) · r · Σ g·d  -  Σ δ·(g + λ d)        (= A - B)
          den = Σ δ·δ                                        (= C)
          β   = clip(num / den, 0, β_max) if den > 0 and finite, else β_max (fallback)
          β   ← policy(β)
          d   ← ((β + λ) d + (1 - β) g) / (1 + λ)
          x   ← x - η_t d

    d is a convex combination of d and g (dampened), unlike ``torch.optim.SGD``'s
    d ← β d + g (so ``dampening`` and ``nesterov`` are refused). ``momentum`` is β_max
    (torch SGD's name, which ``OneCycleLR(cycle_momentum=True)`` schedules; ``beta_max=`` is
    an alias). ``maximize=True`` ascends (the gradient is negated). Without the clip λ
    cancels exactly (β(λ) = β(0)(1+λ) - λ); λ acts only through the clip, as a floor
    λ/(1+λ) of memory. Groups, layers, reducer, policies, attributes (``found_inf``,
    ``skip_nonfinite``, ``last_skipped`` included), β introspection and checkpoints: as
    :class:`AMAdamW`. ``foreach``: as AMAdamW; ``fused=True``: the C++ kernels on CPU (as
    AMAdamW; foreach where they cannot be built: there are no compiled AM-SGD kernels), the
    multi-tensor Triton kernels on CUDA; ``impl=``: as AMAdamW's, without "compiled".
    ``state_dtype``, ``stochastic_rounding``, ``sr_seed``: as AMAdamW's (bf16 parameters: d in
    float32 by default, x ← SR(x - η d) computed in float32).
    Per-param state: ``momentum_buffer`` (not created by a skipped step). ``last_sums`` is [L, 4] = A, B, C, count.
    """

    _name = "AMSGD"
    IMPLS = ("auto", *SGD_IMPLS)

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = _MOMENTUM_DEFAULT,
        lam: float = 0.1,
        weight_decay: float = 0.0,
        per_layer: bool = False,
        beta_policy: str = "am",
        beta_min: float = 0.0,
        restart_threshold: float = 0.7,
        restart_low: float = 0.1,
        reducer=None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        skip_nonfinite: bool = False,
        maximize: bool = False,
        dampening: float = 0.0,
        nesterov: bool = False,
        *,
        beta_max: Optional[float] = None,
        impl: Optional[str] = None,
        state_dtype: str = "fp32",
        stochastic_rounding: bool = True,
        sr_seed: int = 0,
    ):
        momentum = _beta_max_of(momentum, beta_max)
        refuse(self._name, "dampening", dampening, 0.0,
               "AM-SGD's d is already dampened: a convex combination ((β+λ)d + (1-β)g)/(1+λ) with the solved β")
        refuse(self._name, "nesterov", nesterov, False,
               "β is solved for the heavy-ball model of d; a Nesterov look-ahead is a different model")
        self._validate_group(dict(lr=lr, momentum=momentum, lam=lam, weight_decay=weight_decay))
        defaults = dict(lr=lr, momentum=momentum, lam=lam, weight_decay=weight_decay, per_layer=per_layer,
                        beta_policy=beta_policy, beta_min=beta_min, restart_threshold=restart_threshold,
                        restart_low=restart_low, maximize=bool(maximize))
        super().__init__(params, defaults, reducer=reducer, foreach=foreach, fused=fused,
                         skip_nonfinite=skip_nonfinite, impl=impl, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed)

    def _upgrade_group(self, group: dict) -> None:
        if "beta_max" in group:  # groups saved before `momentum`, or given with the alias
            alias = group.pop("beta_max")
            group["momentum"] = _beta_max_of(group["momentum"], alias) if "momentum" in group else alias

    def _beta_max(self, group: dict) -> float:
        return group["momentum"]

    def _validate_group(self, group: dict) -> None:
        validate_common(group["lr"], group["momentum"], group["lam"], group["weight_decay"])

    @eager_step
    @torch.no_grad()
    def step(self, closure=None):
        """One AM-SGD step. Params whose grad is None are skipped (state untouched)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layers, _ = self._layers()
        reduce = self._reducer()
        groups, owners = [], []
        sr_step, index = self._next_sr_step(), -1
        for group in self.param_groups:
            g = SGDGroup([], [], [], [], lr=group["lr"], lr_ratio=self._take_lr_ratio(group),
                         weight_decay=group["weight_decay"], lam=group["lam"])
            owner, keys = [], []
            g.lowp_state_dtype = torch.float32 if self.state_dtype == "fp32" else None
            for p in group["params"]:
                index += 1  # over all parameters, with a gradient or not: a tensor's SR key is stable
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AMSGD does not support sparse gradients")
                buf = self.state[p].get("momentum_buffer")
                g.params.append(local(p))
                g.grads.append(local(p.grad))
                g.momentum_buffers.append(local(buf))
                g.layers.append(layers[p])
                g.weights.append(self._weight(p))
                owner.append(p)
                keys.append(self._sr_key(p, sr_step, index))
            g.sr_keys = keys if any(k is not None for k in keys) else None
            g.grads = signed_grads(g.grads, group)
            groups.append(g)
            owners.append(owner)
        self._beta_state, self.last_sums, skip = am_sgd(
            groups, self._get_beta_state(), self._beta_config(), reduce=reduce, impl=self._resolved_impl(),
            force_beta=self._force_beta, found_inf=self.found_inf, skip_nonfinite=self.skip_nonfinite)
        self._record_skip(skip, [])  # AM-SGD keeps no step counter
        for g, owner in zip(groups, owners):  # buffers created on a tensor's first step (not if skipped)
            for p, buf in zip(owner, g.momentum_buffers):
                if buf is not None and "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = _like_param(p, buf)
        return loss


def _like_param(p, buf):
    """Wrap a new local buffer like its parameter (a DTensor for DTensor params)."""
    from .reduce import is_dtensor

    if is_dtensor(p):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(buf, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    return buf
