"""β from the packed sums, the β policies, and routing partial sums to β's ("layers").

Shared by AM-AdamW and AM-SGD. Everything here stays on the device: no ``.item()``,
no host sync; the fallback and first-step rules are ``torch.where`` selections.

Vocabulary
----------
*layer*: the set of elements sharing one β. Global variant: one layer holding every
element of every param group. ``per_layer``: one layer per parameter tensor, or per
param group when the group sets ``layer_per_group=True``. A flat-shard hook lets one
tensor hold elements of several layers (see :func:`elementwise_layer_sums`).

*packed sums*: a ``[n_layers, K + 1]`` float32/float64 matrix. Columns ``0..K-1`` are
the spec's sums (AM-AdamW: A, B, C, D; AM-SGD: A, B, C); the last column counts the
elements that contributed this step, so that after the all-reduce every rank agrees on
which layers were present (a layer with no element anywhere keeps its β state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POLICIES = ("am", "clip", "restart")


@dataclass
class BetaConfig:
    """Optimizer-wide β hyper-parameters (a β is shared across groups, so these are too)."""

    beta_max: float
    policy: str = "am"
    beta_min: float = 0.0
    restart_threshold: float = 0.7
    restart_low: float = 0.1


def beta_from_sums(num: Tensor, den: Tensor, beta_max: float, first: Tensor) -> tuple[Tensor, Tensor]:
    """β_AM = clip(num / den, 0, β_max), with the spec's first-step and fallback values.

    Shapes: ``num``, ``den``, ``first`` are ``[L]`` (one entry per layer).
    Returns ``(beta, fallback)``; ``fallback`` is True where den <= 0 or the ratio is not
    finite (and it is not the first step). Why the fallback is β_max: den = Σ w δ² = 0
    means d = g on every element (e.g. all-zero gradients), where the model-based
    problem is degenerate; keeping full memory is the conservative, AdamW-like choice.
    """
    ok = (den > 0) & torch.isfinite(num) & torch.isfinite(den)
    # Divide by a safe denominator so no inf/NaN is ever produced (0/0 is never formed).
    ratio = num / torch.where(ok, den, torch.ones_like(den))
    beta = torch.where(ok, ratio.clamp(0.0, beta_max), torch.full_like(ratio, beta_max))
    beta = torch.where(first, torch.full_like(beta, beta_max), beta)
    return beta, (~ok) & (~first)


def apply_policy(beta: Tensor, cfg: BetaConfig) -> Tensor:
    """The spec's β policies acting on β_AM (after clip, first-step and fallback values).

    ``"am"``: unchanged. ``"clip"``: max(β, β_min). ``"restart"``: β_max if β ≥ θ else
    ``restart_low``.
    """
    if cfg.policy == "am":
        return beta
    if cfg.policy == "clip":
        return beta.clamp(min=cfg.beta_min)
    if cfg.policy == "restart":
        return torch.where(
            beta >= cfg.restart_threshold,
            torch.full_like(beta, cfg.beta_max),
            torch.full_like(beta, cfg.restart_low),
        )
    raise ValueError(f"Invalid beta_policy: {cfg.policy!r} (must be one of {POLICIES})")


@dataclass
class BetaState:
    """Per-layer β state, all ``[L]`` tensors on the parameters' device.

    pi: running product of the β's used (π = 1 before the first step; AM-AdamW's bias
        correction c1 = 1 - β_max·π). AM-SGD keeps it too (unused) so both optimizers
        checkpoint the same layout.
    last_beta: the β used on the layer's last step (β_max before any step).
    beta_step: how many steps the layer has taken (0 selects the first-step rule).
    fallback_count: 0-d int64, layer-steps that hit the fallback.
    """

    pi: Tensor
    last_beta: Tensor
    beta_step: Tensor
    fallback_count: Tensor

    @classmethod
    def fresh(cls, n_layers: int, beta_max: float, device, dtype=torch.float32) -> "BetaState":
        return cls(
            pi=torch.ones(n_layers, device=device, dtype=dtype),
            last_beta=torch.full((n_layers,), beta_max, device=device, dtype=dtype),
            beta_step=torch.zeros(n_layers, device=device, dtype=torch.int64),
            fallback_count=torch.zeros((), device=device, dtype=torch.int64),
        )

    def resized(self, n_layers: int, beta_max: float) -> "BetaState":
        """Grow (new layers get fresh state) — used when param groups are added."""
        old = self.pi.numel()
        if n_layers == old:
            return self
        if n_layers < old:
            raise RuntimeError(f"the number of β layers shrank from {old} to {n_layers}")
        new = BetaState.fresh(n_layers - old, beta_max, self.pi.device, self.pi.dtype)
        return BetaState(
            pi=torch.cat([self.pi, new.pi]),
            last_beta=torch.cat([self.last_beta, new.last_beta]),
            beta_step=torch.cat([self.beta_step, new.beta_step]),
            fallback_count=self.fallback_count,
        )

    def unless(self, skip: Tensor, old: "BetaState") -> "BetaState":
        """This state, or ``old`` where the 0-d ``skip`` is true (a skipped step), on device."""
        return BetaState(**{k: torch.where(skip, getattr(old, k), v) for k, v in self.to_dict().items()})

    def to_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in ("pi", "last_beta", "beta_step", "fallback_count")}


def elementwise_layer_sums(products: Tensor, element_layer: Tensor, n_layers: int) -> Tensor:
    """Per-layer sums of ``products`` (``[K, N]``) by an element→layer map (``[N]`` int64).

    Returns ``[L, K]``. Used for tensors whose elements belong to several layers (flat
    shards). Id ``n_layers`` marks padding (no layer): it is summed into a spare row that
    is dropped, so padding neither adds sums nor marks a layer present.
    """
    out = torch.zeros(n_layers + 1, products.shape[0], dtype=products.dtype, device=products.device)
    return out.index_add_(0, element_layer, products.t())[:n_layers]


def at_layer(per_layer: Tensor, layer) -> Tensor:
    """``per_layer[layer]`` for an int layer (0-d view) or an element→layer map
    (per-element gather; padding id ``L`` reads 1.0, harmless on zero padding)."""
    if isinstance(layer, Tensor):
        return torch.cat([per_layer, per_layer.new_ones(1)])[layer]
    return per_layer[layer]


def finish_beta(
    packed: Tensor,
    num: Tensor,
    den: Tensor,
    state: BetaState,
    cfg: BetaConfig,
    force_beta: float | None = None,
) -> tuple[Tensor, BetaState]:
    """From the all-reduced packed sums to the β used this step, and the new β state.

    ``packed``: ``[L, K + 1]`` (last column: element counts). ``num``, ``den``: ``[L]``.
    Layers with no element anywhere keep their state; their returned β is unused.
    ``force_beta`` is the test-only hook (replaces β after the policy).
    """
    present = packed[:, -1] > 0
    first = state.beta_step == 0
    beta, fallback = beta_from_sums(num, den, cfg.beta_max, first)
    beta = apply_policy(beta, cfg)
    if force_beta is not None:
        beta = torch.full_like(beta, force_beta)
    beta = beta.to(state.pi.dtype)
    new = BetaState(
        pi=torch.where(present, state.pi * beta, state.pi),
        last_beta=torch.where(present, beta, state.last_beta),
        beta_step=state.beta_step + present.to(state.beta_step.dtype),
        fallback_count=state.fallback_count + (fallback & present).sum(),
    )
    return beta, new
