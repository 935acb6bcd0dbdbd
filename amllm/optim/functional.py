"""Pure update math of AM-AdamW and AM-SGD (no ``torch.optim.Optimizer`` bookkeeping).

The rules are in ``docs/optimizer.md`` (and the optimizer docstrings).
One step has three phases, the same for both optimizers:

1. *stats*: per tensor, the partial sums of the spec (A, B, C, D / A, B, C) plus an element
   count, routed to the tensor's layer -> a ``[L, K + 1]`` matrix ``packed``. AM-AdamW's new
   v is computed here but written in phase 3 only, so that a step can still be skipped.
2. *β*: ``packed`` goes through the reducer (ONE collective: sums over ranks that hold
   shards of the same layers), then ``beta.finish_beta`` derives β on device, and the skip
   flag is formed (``found_inf`` / non-finite sums, see ``_skip_flag``).
3. *apply*: the moment and parameter updates with the per-layer β (none on a skipped step).

Implementations of phases 1 and 3 (``impl``), one table per optimizer, ``ADAMW_KERNELS`` and
``SGD_KERNELS``: ``{path: (stats, apply)}``, every path a pair of named functions
(``_adamw_stats_foreach``, ``_sgd_apply_triton``, ...) with the same signatures
(``stats(grp, idx, ctx) -> (sums, scratch)``, ``apply(grp, idx, scratch, ctx, beta, skip)``).
``_buckets`` resolves the requested ``impl`` per (path, device, dtype) bucket to a key of the
table; one step then calls each bucket's pair:

* ``"forloop"``: one tensor at a time, written line by line from the spec. Readable;
  also the only one that handles tensors whose elements belong to several layers
  (flat-shard hook: ``layer`` given as an int64 element→layer map).
* ``"foreach"``: ``torch._foreach_*`` multi-tensor ops per (device, dtype) bucket, with
  algebraic rewrites that save passes over memory (documented inline).
* ``"fused"``: hand-fused kernels, two passes over memory per step, no temporaries:
  on CPU the C++ kernels of ``csrc/am_cpu.cpp`` (``_cpu_ext.py``: one call per pass for a
  whole bucket, both optimizers), then AM-AdamW's ``torch.compile``d per-tensor kernels
  (``_compiled.py``) where those cannot be built; on CUDA (any non-CPU device) the
  multi-tensor Triton kernels of ``_triton.py`` (three launches per bucket and step, both
  optimizers). ``"cpp"``, ``"compiled"`` and ``"triton"`` force one of them where it can
  run (tests, benchmarks; ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``).
  Whatever cannot be built falls back to ``"foreach"`` (warning once); non-contiguous
  tensors (and, for ``"compiled"``, tensors of fewer than 2 elements) take the for-loop
  lines; tensors whose grad or state dtype differs from the parameter's take foreach.

All are tested against an independent float64 oracle (``tests/reference_am.py``).

Skipping a step (``found_inf``, ``skip_nonfinite``): the Triton and C++ kernels read the
flag themselves (no host read); the foreach, for-loop and compiled paths read it on the
host once per group (they are fallbacks). Either way nothing but the stored previous lr
changes (see ``docs/optimizer.md``).

Numerics: statistics (sums, β, π) are computed in float32, or float64 for float64
parameters, whatever the parameter dtype. For bf16/fp16 parameters the math of a tensor
runs in float32 on upcast copies and is rounded once when written back. The moments d, v
are kept in the dtype the optimizer created them in (``state_dtype``: float32 for bf16/fp16
parameters by default, else the parameter dtype).

Low-precision parameters (``"mixed"``, in both tables): a bf16/fp16 tensor whose state dtype
differs from its own, or that is written back with stochastic rounding (``sr_keys``: a key per
tensor, see ``rounding.py``), takes the ``"mixed"`` path whatever fused path was asked for:
the foreach math in float32, the parameter written with ``rounding.round_to`` (stochastic
rounding for bf16), and the skip flag honoured on the device (``torch.where`` on the new
values), so that it stays free of host reads on CUDA. The for-loop lines do the same one
tensor at a time (reading the skip flag on the host, as every for-loop step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import _compiled, _cpu_ext, _tables, _triton, rounding
from .beta import BetaConfig, BetaState, at_layer, elementwise_layer_sums, finish_beta

Reducer = Optional[Callable[[Tensor], Tensor]]
Layer = Union[int, Tensor]  # a layer index, or an int64 element→layer map (flat shards)

_FUSED = ("fused", "cpp", "compiled", "triton")
_LOWP = (torch.bfloat16, torch.float16)


@dataclass
class AdamWGroup:
    """The tensors of one param group that have a gradient this step (local shards).

    Lists are aligned, one entry per parameter tensor. ``steps`` are the per-tensor step
    counters (0-d float32 tensors on the parameter's device) *before* this step: the
    kernels use t = step + 1, and the caller increments them once the step is known not
    to be skipped. ``layers``: see ``Layer``. ``weights``: a
    multiplier per tensor on its partial sums (1.0, or 1/R for a tensor replicated on the
    R ranks of the reduce group, so that it counts once).
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    layers: list[Layer]
    lr: float
    lr_ratio: float
    weight_decay: float
    eps: float
    beta2: float
    lam: float
    weights: list[float] = field(default_factory=list)
    buckets: Optional[dict] = None  # set by the first phase of a step (see _buckets)
    #: Stochastic rounding of bf16 parameters: one key per tensor (``rounding.tensor_key``), or
    #: None for round-to-nearest (the whole group, or one tensor).
    sr_keys: Optional[list] = None


@dataclass
class SGDGroup:
    """Like ``AdamWGroup``; ``momentum_buffers[i]`` is None before the tensor's first step."""

    params: list[Tensor]
    grads: list[Tensor]
    momentum_buffers: list[Optional[Tensor]]
    layers: list[Layer]
    lr: float
    lr_ratio: float
    weight_decay: float
    lam: float
    weights: list[float] = field(default_factory=list)
    sr_keys: Optional[list] = None  # as AdamWGroup's
    #: The dtype of a new momentum buffer of a bf16/fp16 parameter (float32: ``state_dtype="fp32"``);
    #: None: the parameter's.
    lowp_state_dtype: Optional[torch.dtype] = None


def lr_ratio(prev_lr: Optional[float], lr: float) -> float:
    """r = η_{t-1} / η_t; 1 on the first step or when η_t = 0 (spec [choice])."""
    if prev_lr is None or lr == 0:
        return 1.0
    return prev_lr / lr


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _up(t: Tensor) -> Tensor:
    """The tensor itself when it already has the compute dtype, else a float32 copy."""
    return t.to(_compute_dtype(t))


def _writeback(dst: Tensor, src: Tensor) -> None:
    if src is not dst:
        dst.copy_(src)


def _sr_key(grp, i: int) -> Optional[int]:
    return None if grp.sr_keys is None else grp.sr_keys[i]


def _write_param(grp, i: int, x_new: Tensor) -> None:
    """x ← x_new, rounded stochastically for bf16 with a key (``rounding.round_to``)."""
    x = grp.params[i]
    key = _sr_key(grp, i)
    if key is None or x.dtype != torch.bfloat16:
        x.copy_(x_new)
    else:
        x.copy_(rounding.round_to(x.dtype, x_new, key))


def _needs_mixed(grp, i: int, others) -> bool:
    """A bf16/fp16 tensor with another state dtype, or stochastically rounded: the "mixed" path."""
    x = grp.params[i]
    return x.dtype in _LOWP and (_sr_key(grp, i) is not None or not _same_dtypes(i, grp.params, others))


def _keep(dst: Tensor, new: Tensor, skip: Optional[Tensor]) -> None:
    """dst ← new, unless the step is skipped (decided on the device: no host read)."""
    if skip is None:
        dst.copy_(new)
    else:
        dst.copy_(torch.where(skip, dst, new.to(dst.dtype)))


def _layer_sums(terms: list[Tensor], layer: Layer, n_layers: int, weight: float) -> Tensor:
    """``K`` product tensors of one tensor -> its ``[L, K+1]`` contribution (last: count)."""
    dtype = terms[0].dtype
    if isinstance(layer, Tensor):  # flat shard: elements of several layers
        flat = torch.stack([t.reshape(-1) for t in terms] + [torch.ones_like(terms[0]).reshape(-1)])
        out = elementwise_layer_sums(flat, layer, n_layers)
        out[:, :-1] *= weight
        return out
    out = torch.zeros(n_layers, len(terms) + 1, dtype=dtype, device=terms[0].device)
    out[layer, :-1] = torch.stack([t.sum() for t in terms]) * weight
    out[layer, -1] = terms[0].numel()
    return out


def _rows_to_layers(rows: Tensor, grp, idx: list[int], n_layers: int) -> Tensor:
    """Per-tensor sums ``[n, K]`` -> ``[L, K+1]`` (weights applied, element counts last).

    One matmul with a cached ``[L, n]`` layer/weight matrix (``_tables.layer_matrix``):
    no per-tensor loop, deterministic, and no host-to-device copy in steady state.
    """
    m, counts = _tables.layer_matrix([grp.layers[i] for i in idx], [grp.weights[i] for i in idx],
                                     [grp.params[i].numel() for i in idx], n_layers, rows.device, rows.dtype)
    return torch.cat([m @ rows, counts], 1)


def _isc2(grp: "AdamWGroup", idx: list[int]) -> Tensor:
    """1/sqrt(1 - β2^t) per tensor, t = step + 1, as a float64 vector on the counters' device
    (computed there: no host read of the counters)."""
    t = torch.stack([grp.steps[i] for i in idx]).double() + 1
    return (1 - torch.pow(grp.beta2, t)).rsqrt()


def _same_dtypes(i: int, tensors, others) -> bool:
    return all(x[i] is None or x[i].dtype == tensors[i].dtype for x in others)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


@dataclass
class _Ctx:
    """What every kernel of one step needs besides its group and bucket: the layer count, the
    statistics' dtype and device (the β state's), and AM-AdamW's c1 per layer ``[L]``."""

    n_layers: int
    dtype: torch.dtype
    device: torch.device
    c1: Optional[Tensor] = None


#: Paths that read the skip flag themselves (in the kernel or on the device, no host read); the
#: others run only when the host has read it as false (see ``_apply_buckets``).
_SELF_SKIPPING = ("triton", "cpp", "mixed")


def _buckets(n: int, tensors: list[Tensor], layers: list[Layer], impl: str = "foreach", others=(),
             kernels: Optional[dict] = None, mixed: Optional[list[bool]] = None) -> dict:
    """Indices grouped by ``(impl, device, dtype)``, each bucket's impl resolved to a key of
    ``kernels`` (the optimizer's table; default AM-AdamW's):

    element→layer maps always take ``"forloop"``. The fused impls need contiguous
    tensors (``tensors`` and every list in ``others``), else ``"forloop"``, and one dtype
    for a tensor and its grad/state, else ``"foreach"``. Then ``"fused"`` takes, on CPU, the
    C++ kernels where they build, then (when the table has them) the torch.compile'd
    kernels, and on any other device (CUDA) the Triton kernels; ``"cpp"``, ``"compiled"``,
    ``"triton"`` force theirs. Whatever is unavailable: ``"foreach"``. The compiled kernels
    skip tensors of < 2 elements (``"forloop"``). ``mixed[i]`` (a low-precision parameter with
    float32 state or stochastic rounding, see ``_needs_mixed``): ``"mixed"`` unless ``"forloop"``.
    """
    compiled = "compiled" in (ADAMW_KERNELS if kernels is None else kernels)
    out: dict = {}
    triton_ok: dict = {}  # (device, dtype) -> bool, asked once per step, not per tensor
    for i in range(n):
        t = tensors[i]
        if impl == "forloop" or isinstance(layers[i], Tensor):
            key = ("forloop", None, None)
        elif mixed is not None and mixed[i]:
            key = ("mixed", t.device, t.dtype)
        elif impl in _FUSED and not all(x[i].is_contiguous() for x in (tensors, *others)):
            key = ("forloop", None, None)
        elif impl in _FUSED and not _same_dtypes(i, tensors, others):
            key = ("foreach", t.device, t.dtype)
        elif impl == "triton" or (impl == "fused" and t.device.type != "cpu"):
            ok = triton_ok.get((t.device, t.dtype))
            if ok is None:
                ok = triton_ok[t.device, t.dtype] = _triton.available(t.device, t.dtype)
            key = ("triton" if ok else "foreach", t.device, t.dtype)
        elif impl in ("fused", "cpp") and _cpu_ext.available(t.device, t.dtype):
            key = ("cpp", t.device, t.dtype)
        elif impl in _FUSED and compiled and t.numel() < 2:
            key = ("forloop", None, None)
        elif impl in _FUSED and compiled and _compiled.available(t.device, t.dtype):
            key = ("compiled", t.device, t.dtype)
        else:
            key = ("foreach", t.device, t.dtype)
        out.setdefault(key, []).append(i)
    return out


def _skip_flag(found_inf: Optional[Tensor], skip_nonfinite: bool, packed: Tensor) -> Optional[Tensor]:
    """0-d bool on ``packed``'s device: skip this step; None when no skip is possible.

    ``found_inf`` nonzero (the GradScaler protocol), or, with ``skip_nonfinite``, any
    non-finite entry of the all-reduced sums: a NaN/inf gradient anywhere on any rank makes
    them non-finite, so every rank decides the same without another collective.
    """
    skip = None
    if found_inf is not None:
        # onto the host (optimizer offload: CPU statistics) the copy must block: a non-blocking
        # device-to-host copy may be read before it lands; host-to-device can be asynchronous
        skip = (found_inf.to(packed.device, non_blocking=packed.device.type != "cpu") != 0).any()
    if skip_nonfinite:
        bad = torch.isfinite(packed).all().logical_not()
        skip = bad if skip is None else skip | bad
    return skip


def _host_skip(skip: Optional[Tensor]) -> bool:
    """The fallback paths (foreach, for-loop, compiled) read the flag on the host."""
    return skip is not None and bool(skip)


def _stats_of(kernels: dict, grp, buckets: dict, ctx: _Ctx, packed: Optional[Tensor] = None):
    """Phase 1 over a group's buckets, each by its path's ``stats``: ``packed`` plus the buckets'
    ``[L, K+1]`` sums (None without either) and the scratch per bucket for phase 3."""
    scratch = {}
    for key, idx in buckets.items():
        part, scratch[key] = kernels[key[0]][0](grp, idx, ctx)
        packed = part if packed is None else packed + part.to(packed.device, packed.dtype)
    return packed, scratch


def _apply_buckets(buckets: dict, skip: Optional[Tensor]):
    """The buckets whose apply phase runs: the Triton and C++ kernels honour the skip flag
    themselves; the fallback paths run only if it is false, read on the host at most once."""
    host_skip = None
    for key, idx in buckets.items():
        if key[0] not in _SELF_SKIPPING:
            if host_skip is None:
                host_skip = _host_skip(skip)
            if host_skip:
                continue
        yield key, idx


def _apply_of(kernels: dict, grp, buckets: dict, scratch: dict, ctx: _Ctx, beta: Tensor, skip: Optional[Tensor]):
    """Phase 3 over a group's buckets, each by its path's ``apply``."""
    for key, idx in _apply_buckets(buckets, skip):
        kernels[key[0]][1](grp, idx, scratch[key], ctx, beta, skip)


def _host_scalars(vec: Tensor, layers: list[Layer], idx: list[int]) -> list[float]:
    """``vec[layer]`` per tensor as Python floats (the C++ kernels run on CPU: no device sync)."""
    h = vec.tolist()
    return [h[layers[i]] for i in idx]


# ----------------------------------------------------------------------------- AM-AdamW
# Each path is a (stats, apply) pair in ADAMW_KERNELS:
#   stats(grp, idx, ctx) -> ([L, 5] sums A, B, C, D, count of the bucket's tensors, scratch)
#   apply(grp, idx, scratch, ctx, beta, skip): v, d and x in place (skip: see _apply_buckets)


def _adamw_stats_one(x, g, d, v, *, isc2, c1, beta2, eps, lam, wd, coef_a, layer, n_layers, weight):
    """Spec lines for one tensor: the new v (kept for the apply phase), then the terms of
    A, B, C, D. Returns (sums, p, v_new)."""
    X, G, Dm = _up(x), _up(g), _up(d)
    V = _up(v) * beta2 + (1 - beta2) * G * G  # v ← β2 v + (1-β2) g² (written when applied)
    p = c1 * (torch.sqrt(V) * isc2 + eps)  # diagonal of P_t: c1 (sqrt(v / c2) + ε)
    w = 1 / (p * (1 + lam * p))  # diagonal of P̃_t⁻¹
    delta = Dm - G
    a = coef_a * G * (Dm / p + wd * X)  # A = r(1+μη) Σ g·(d/p + μx)
    b = w * delta * (G + lam * p * Dm)  # B = Σ w δ (g + λ p d)
    c = w * delta * delta  # C = Σ w δ²
    dd = wd * delta * X  # D = μ Σ δ x
    return _layer_sums([a, b, c, dd], layer, n_layers, weight), p, V


def _adamw_apply_one(x, g, d, v, p, v_new, beta, *, lr, wd, lam):
    """Writes v and d; returns the new x in the compute dtype (the caller writes it back)."""
    X, G, Dm = _up(x), _up(g), _up(d)
    d_new = (Dm * (beta + lam * p) + (1 - beta) * G) / (1 + lam * p)
    x_new = X * (1 - lr * wd) - lr * d_new / p
    v.copy_(v_new)
    d.copy_(d_new)
    return x_new


def _adamw_stats_forloop(grp: AdamWGroup, idx: list[int], ctx: _Ctx):
    """The spec's lines, one tensor at a time (also element→layer maps)."""
    parts, pv = [], []
    isc2 = _isc2(grp, idx).to(ctx.c1.dtype)
    for k, i in enumerate(idx):
        layer = grp.layers[i]
        part_i, p, v_new = _adamw_stats_one(
            grp.params[i], grp.grads[i], grp.exp_avgs[i], grp.exp_avg_sqs[i],
            isc2=isc2[k], c1=at_layer(ctx.c1, layer), beta2=grp.beta2, eps=grp.eps, lam=grp.lam,
            wd=grp.weight_decay, coef_a=grp.lr_ratio * (1 + grp.weight_decay * grp.lr),
            layer=layer, n_layers=ctx.n_layers, weight=grp.weights[i],
        )
        parts.append(part_i)
        pv.append((p, v_new))
    return torch.stack(parts).sum(0), pv


def _adamw_apply_forloop(grp: AdamWGroup, idx: list[int], pv, ctx: _Ctx, beta: Tensor, skip):
    for i, (p, v_new) in zip(idx, pv):
        x_new = _adamw_apply_one(grp.params[i], grp.grads[i], grp.exp_avgs[i], grp.exp_avg_sqs[i], p, v_new,
                                 at_layer(beta, grp.layers[i]), lr=grp.lr, wd=grp.weight_decay, lam=grp.lam)
        _write_param(grp, i, x_new)


def _adamw_stats_foreach(grp: AdamWGroup, idx: list[int], ctx: _Ctx):
    """Multi-tensor stats for one (device, dtype) bucket.

    Rewrites vs the spec lines (exact algebra, fewer passes):
      q = d/p;  B = Σ w δ (g + λ p d) = Σ δ q - C  (substitute g = d - δ and w(1+λp) = 1/p)
      w δ is kept (as ``wd_``) for the update: d_new = d - (1-β) (w δ) p.
    The new v is a new list (written back by the apply phase).
    """
    c1 = ctx.c1
    X = [_up(grp.params[i]) for i in idx]
    G = [_up(grp.grads[i]) for i in idx]
    Dm = [_up(grp.exp_avgs[i]) for i in idx]
    b2, lam, mu = grp.beta2, grp.lam, grp.weight_decay
    V = torch._foreach_mul([_up(grp.exp_avg_sqs[i]) for i in idx], b2)
    torch._foreach_addcmul_(V, G, G, value=1 - b2)
    c1s = [c1[grp.layers[i]] for i in idx]  # 0-d views, no host sync
    # p = c1·sqrt(v)/sqrt(c2) + c1·ε, with 1/sqrt(c2) per tensor from its step counter (on device)
    P = torch._foreach_sqrt(V)
    torch._foreach_mul_(P, torch._foreach_mul(c1s, list(_isc2(grp, idx).to(c1.dtype).unbind())))
    torch._foreach_add_(P, torch._foreach_mul(c1s, grp.eps))
    Q = torch._foreach_div(Dm, P)
    Delta = torch._foreach_sub(Dm, G)
    if lam != 0:
        PU = torch._foreach_addcmul(P, P, P, value=lam)  # p (1 + λ p)
        WDelta = torch._foreach_div(Delta, PU)
        del PU
    else:
        WDelta = torch._foreach_div(Delta, P)
    raw = []
    for k in range(len(idx)):
        row = [_dot(G[k], Q[k]), _dot(Delta[k], Q[k]), _dot(WDelta[k], Delta[k])]
        if mu != 0:
            row += [_dot(G[k], X[k]), _dot(Delta[k], X[k])]
        raw.append(torch.stack(row))
    del Q, Delta
    raw = torch.stack(raw)  # [n, 3 or 5]: Σgq, Σδq, C, (Σgx, Σδx)
    return _rows_to_layers(_adamw_rows(raw, grp), grp, idx, ctx.n_layers), (X, Dm, P, WDelta, V)


def _adamw_apply_foreach(grp: AdamWGroup, idx: list[int], scratch, ctx: _Ctx, beta: Tensor, skip):
    X, Dm, P, S, V = scratch
    torch._foreach_mul_(S, [1 - beta[grp.layers[i]] for i in idx])  # S = (1-β) w δ
    torch._foreach_addcmul_(Dm, S, P, value=-1)  # d ← d - (1-β) δ/(1+λp)
    if grp.weight_decay != 0:
        torch._foreach_mul_(X, 1 - grp.lr * grp.weight_decay)
    torch._foreach_addcdiv_(X, Dm, P, value=-grp.lr)  # x ← x(1-ημ) - η d/p
    torch._foreach_copy_([grp.exp_avg_sqs[i] for i in idx], V)
    for k, i in enumerate(idx):
        _writeback(grp.exp_avgs[i], Dm[k])
        _writeback(grp.params[i], X[k])


def _adamw_apply_mixed(grp: AdamWGroup, idx: list[int], scratch, ctx: _Ctx, beta: Tensor, skip):
    """The foreach update in float32 into new tensors, then written back unless skipped (on the
    device): v and d in their dtype, x rounded (stochastically for bf16 with a key)."""
    X, Dm, P, S, V = scratch
    torch._foreach_mul_(S, [1 - beta[grp.layers[i]] for i in idx])  # S = (1-β) w δ
    Dn = torch._foreach_addcmul(Dm, S, P, value=-1)  # d - (1-β) δ/(1+λp): new tensors (Dm may be d)
    Xn = torch._foreach_mul(X, 1 - grp.lr * grp.weight_decay) if grp.weight_decay != 0 else X
    torch._foreach_addcdiv_(Xn, Dn, P, value=-grp.lr)  # X is an upcast copy: x itself is bf16/fp16
    for k, i in enumerate(idx):
        _keep(grp.exp_avg_sqs[i], V[k], skip)
        _keep(grp.exp_avgs[i], Dn[k], skip)
        _keep(grp.params[i], rounding.round_to(grp.params[i].dtype, Xn[k], _sr_key(grp, i)), skip)


def _adamw_rows(raw: Tensor, grp: AdamWGroup) -> Tensor:
    """``[n, 3 or 5]`` raw sums (Σgq, Σδq, C, (Σgx, Σδx)) -> ``[n, 4]`` = A, B, C, D.
    (Linear in ``raw``: applied to per-tensor or to per-layer sums alike.)"""
    mu = grp.weight_decay
    coef_a = grp.lr_ratio * (1 + mu * grp.lr)
    a = coef_a * (raw[:, 0] + mu * raw[:, 3]) if mu != 0 else coef_a * raw[:, 0]
    d_ = mu * raw[:, 4] if mu != 0 else torch.zeros_like(a)
    return torch.stack([a, raw[:, 1] - raw[:, 2], raw[:, 2], d_], 1)


def _adamw_stats_compiled(grp: AdamWGroup, idx: list[int], ctx: _Ctx):
    """Pass 1 of the compiled path: five partial sums per tensor (v is written in pass 2)."""
    c1 = ctx.c1
    f = _compiled.compiled("adamw_pass1")
    F = _compiled.flat
    isc2 = _isc2(grp, idx).to(c1.dtype)
    raw = torch.stack([
        f(F(grp.params[i]), F(grp.grads[i]), F(grp.exp_avgs[i]), F(grp.exp_avg_sqs[i]), c1[grp.layers[i]],
          grp.beta2, grp.eps, grp.lam, isc2[k])
        for k, i in enumerate(idx)])
    return _rows_to_layers(_adamw_rows(raw, grp), grp, idx, ctx.n_layers), isc2


def _adamw_apply_compiled(grp: AdamWGroup, idx: list[int], isc2: Tensor, ctx: _Ctx, beta: Tensor, skip):
    """Pass 2 of the compiled path: v, d and x in place (v and p recomputed)."""
    c1 = ctx.c1
    f = _compiled.compiled("adamw_pass2")
    F = _compiled.flat
    for k, i in enumerate(idx):
        f(F(grp.params[i]), F(grp.grads[i]), F(grp.exp_avgs[i]), F(grp.exp_avg_sqs[i]), c1[grp.layers[i]],
          beta[grp.layers[i]], grp.beta2, grp.eps, grp.lam, isc2[k], grp.lr, grp.weight_decay)


def _adamw_stats_cpp(grp: AdamWGroup, idx: list[int], ctx: _Ctx):
    """Pass 1 of the C++ kernels: the sums of all tensors in one call (Σgx, Σδx only with
    weight decay: x is then not read at all; v is written in pass 2). The bucket's tensor
    lists go into the scratch for pass 2."""
    c1 = ctx.c1
    ext = _cpu_ext.load()
    c1s = _host_scalars(c1, grp.layers, idx)
    isc2 = _isc2(grp, idx).tolist()  # CPU counters: a read of host memory, not a device sync
    xgdv = [[lst[i] for i in idx] for lst in (grp.params, grp.grads, grp.exp_avgs, grp.exp_avg_sqs)]
    with_x = grp.weight_decay != 0
    raw = ext.adamw_pass1(*xgdv, c1s, isc2, grp.beta2, grp.eps, grp.lam, with_x)
    raw = raw.to(c1.dtype)[:, :5 if with_x else 3]
    return _rows_to_layers(_adamw_rows(raw, grp), grp, idx, ctx.n_layers), (xgdv, c1s, isc2)


def _adamw_apply_cpp(grp: AdamWGroup, idx: list[int], scratch, ctx: _Ctx, beta: Tensor, skip):
    xgdv, c1s, isc2 = scratch
    _cpu_ext.load().adamw_pass2(*xgdv, c1s, _host_scalars(beta, grp.layers, idx), isc2, grp.beta2, grp.eps,
                                grp.lam, grp.lr, grp.weight_decay, skip)


def _adamw_stats_triton(grp: AdamWGroup, idx: list[int], ctx: _Ctx):
    """Pass 1 and the per-layer reduction: two launches for the whole bucket (``[L, 5]`` out)."""
    c1 = ctx.c1
    lists = [[lst[i] for i in idx] for lst in (grp.params, grp.grads, grp.exp_avgs, grp.exp_avg_sqs, grp.steps)]
    sums, meta = _triton.adamw_stats(*lists, [grp.layers[i] for i in idx], [grp.weights[i] for i in idx],
                                     ctx.n_layers, c1, beta2=grp.beta2, eps=grp.eps, lam=grp.lam,
                                     with_x=grp.weight_decay != 0)
    sums = sums.to(c1.dtype)
    return torch.cat([_adamw_rows(sums[:, :-1], grp), sums[:, -1:]], 1), meta


def _adamw_apply_triton(grp: AdamWGroup, idx: list[int], meta, ctx: _Ctx, beta: Tensor, skip):
    _triton.adamw_apply(meta, grp.params[idx[0]].dtype, ctx.c1, beta, skip, beta2=grp.beta2, eps=grp.eps,
                        lam=grp.lam, lr=grp.lr, wd=grp.weight_decay)


#: AM-AdamW's kernel paths: ``{impl: (stats, apply)}`` (see the module docstring).
ADAMW_KERNELS = {
    "forloop": (_adamw_stats_forloop, _adamw_apply_forloop),
    "foreach": (_adamw_stats_foreach, _adamw_apply_foreach),
    "cpp": (_adamw_stats_cpp, _adamw_apply_cpp),
    "compiled": (_adamw_stats_compiled, _adamw_apply_compiled),
    "triton": (_adamw_stats_triton, _adamw_apply_triton),
    "mixed": (_adamw_stats_foreach, _adamw_apply_mixed),
}


#: The ``impl`` names ``am_adamw`` takes: its table's paths and ``"fused"`` (resolved per bucket).
ADAMW_IMPLS = ("forloop", "foreach", "fused", "cpp", "compiled", "triton")
assert set(ADAMW_IMPLS) == {"fused", *ADAMW_KERNELS} - {"mixed"}


def _adamw_buckets(grp: AdamWGroup, impl: str) -> dict:
    """Resolved once per step (stats), reused by the apply phase."""
    if grp.buckets is None:
        others = (grp.grads, grp.exp_avgs, grp.exp_avg_sqs)
        grp.buckets = _buckets(len(grp.params), grp.params, grp.layers, impl, others, ADAMW_KERNELS,
                               [_needs_mixed(grp, i, others) for i in range(len(grp.params))])
    return grp.buckets


def am_adamw(
    groups: list[AdamWGroup],
    state: BetaState,
    cfg: BetaConfig,
    *,
    reduce: Reducer = None,
    impl: str = "foreach",
    force_beta: Optional[float] = None,
    found_inf: Optional[Tensor] = None,
    skip_nonfinite: bool = False,
) -> tuple[BetaState, Tensor, Optional[Tensor]]:
    """One AM-AdamW step over all groups (they share the β's). Mutates params and moments.

    Returns the new β state, the packed sums ``[L, 5]`` = [A, B, C, D, count] after
    reduction (for logging), and the skip flag (0-d bool on device, None when no skip was
    possible: ``found_inf`` None and not ``skip_nonfinite``). ``reduce(packed) -> summed``
    runs exactly once, also when this rank has no tensor with a gradient or the step is
    skipped (so every rank reaches the collective). Step counters are not touched (the
    caller increments them, skip-aware).
    """
    c1 = 1 - cfg.beta_max * state.pi  # [L] conservative bias correction (D.1)
    ctx = _Ctx(state.pi.numel(), state.pi.dtype, state.pi.device, c1)

    def stats(grp):
        if not grp.weights:
            grp.weights = [1.0] * len(grp.params)
        return _stats_of(ADAMW_KERNELS, grp, _adamw_buckets(grp, impl), ctx)

    def num_den(packed):
        return packed[:, 0] - packed[:, 1] - packed[:, 3], packed[:, 2]

    def apply(grp, scratch, beta, skip):
        _apply_of(ADAMW_KERNELS, grp, _adamw_buckets(grp, impl), scratch, ctx, beta, skip)

    return _run(groups, state, cfg, 4, stats, num_den, apply, reduce, force_beta, found_inf, skip_nonfinite)


def adamw_beta_sums(groups: list[AdamWGroup], state: BetaState, beta_max: float) -> Tensor:
    """The sums that say why β is what it is: ``[L, 4]`` = Σ w g², Σ w g·d, Σ w d², count per β.

    Computed before the step (d is the momentum the step starts from) with the step's own p and w,
    by the spec's lines one tensor at a time: an extra pass over g, d and v, so it is opt-in
    (``AMAdamW.beta_terms``). In the w-weighted inner product, C = Σ w d² − 2 Σ w g·d + Σ w g²
    exactly, so with a = |d|/|g|, c = cos(d, g) and ℓ = (A − B − D)/Σ w g² − 1 (everything that is
    not Σ w g² in β's numerator: the λ terms, and the lr-ratio and weight-decay ones),
    β_AM = (1 + ℓ) / (1 + a² − 2ac) before the clip (``beta_terms``). All on device.
    """
    n_layers = state.pi.numel()
    c1 = 1 - beta_max * state.pi
    out = torch.zeros(n_layers, 4, dtype=state.pi.dtype, device=state.pi.device)
    for grp in groups:
        if not grp.params:
            continue
        weights = grp.weights or [1.0] * len(grp.params)
        isc2 = _isc2(grp, list(range(len(grp.params)))).to(c1.dtype)
        for i, layer in enumerate(grp.layers):
            G, Dm = _up(grp.grads[i]).to(c1.dtype), _up(grp.exp_avgs[i]).to(c1.dtype)
            V = _up(grp.exp_avg_sqs[i]).to(c1.dtype) * grp.beta2 + (1 - grp.beta2) * G * G
            p = at_layer(c1, layer) * (torch.sqrt(V) * isc2[i] + grp.eps)
            w = 1 / (p * (1 + grp.lam * p))
            wg = w * G
            part = _layer_sums([wg * G, wg * Dm, w * Dm * Dm], layer, n_layers, weights[i])
            out = out + part.to(out.device, out.dtype)
    return out


def beta_terms(sums: Tensor, packed: Tensor) -> Tensor:
    """``[L, 3]`` = a = |d|/|g|, c = cos(d, g), ℓ from ``adamw_beta_sums`` (after the reduce) and the
    step's packed A, B, C, D (see there). c is 0 where d = 0 (the first step); a, c, ℓ are NaN where
    g = 0 on a whole β (no gradient: nothing to explain). No host read."""
    gg, gd, dd = sums[:, 0], sums[:, 1], sums[:, 2]
    a = torch.sqrt(dd / gg)
    norm = torch.sqrt(dd * gg)
    c = torch.where(norm > 0, gd / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    ell = (packed[:, 0] - packed[:, 1] - packed[:, 3]) / gg - 1
    return torch.stack([a, c, ell], 1)


def _run(groups, state, cfg, k, stats, num_den, apply, reduce, force_beta, found_inf, skip_nonfinite):
    """The phase structure shared by both optimizers (see the module docstring)."""
    packed = torch.zeros(state.pi.numel(), k + 1, dtype=state.pi.dtype, device=state.pi.device)
    scratch = []
    for grp in groups:
        part, sc = stats(grp)
        if part is not None:
            packed = packed + part.to(packed.device, packed.dtype)
        scratch.append(sc)
    if reduce is not None:
        packed = reduce(packed)
    skip = _skip_flag(found_inf, skip_nonfinite, packed)
    num, den = num_den(packed)
    beta, new_state = finish_beta(packed, num, den, state, cfg, force_beta)
    if skip is not None:
        new_state = new_state.unless(skip, state)
    for grp, sc in zip(groups, scratch):
        apply(grp, sc, beta, skip)
    return new_state, packed, skip


# ----------------------------------------------------------------------------- AM-SGD
# The same (stats, apply) pairs in SGD_KERNELS, over the tensors that already have a buffer
# (a tensor's first step, d ← g, is written by ``_sgd_apply`` itself); [L, 4] sums A, B, C, count.


def _sgd_grad(x: Tensor, g: Tensor, wd: float) -> Tensor:
    """Coupled weight decay as torch.optim.SGD: g ← g + μ x (never mutates p.grad)."""
    return g.add(x, alpha=wd) if wd != 0 else g


def _sgd_coef_a(grp: SGDGroup) -> float:
    return (grp.lam + 1) * grp.lr_ratio


def _sgd_stats_one(x, g, d, *, lam, coef_a, wd, layer, n_layers, weight):
    X, G, Dm = _up(x), _up(g), _up(d)
    G = _sgd_grad(X, G, wd)
    delta = Dm - G
    a = coef_a * G * Dm  # (λ+1) r Σ g·d
    b = delta * (G + lam * Dm)  # Σ δ·(g + λ d)
    c = delta * delta  # Σ δ·δ
    return _layer_sums([a, b, c], layer, n_layers, weight)


def _sgd_apply_one(x, g, d, beta, *, lam, lr, wd):
    """Writes d; returns the new x in the compute dtype (the caller writes it back)."""
    X, G, Dm = _up(x), _up(g), _up(d)
    G = _sgd_grad(X, G, wd)
    d_new = ((beta + lam) * Dm + (1 - beta) * G) / (1 + lam)
    d.copy_(d_new)
    return X - lr * d_new


def _sgd_rows(raw: Tensor, grp: SGDGroup) -> Tensor:
    """``[n, 3]`` raw sums (Σ G·d, Σ δ·G, Σ δ·δ, with G = g + μx) -> ``[n, 3]`` = A, B, C:
    Σ δ·(G + λd) = Σ δG + λ(Σ δδ + Σ δG) since d = δ + G (δ kept explicit: Σ dd - 2Σ Gd + Σ GG
    would cancel catastrophically when d ≈ G)."""
    return torch.stack([_sgd_coef_a(grp) * raw[:, 0], raw[:, 1] + grp.lam * (raw[:, 2] + raw[:, 1]), raw[:, 2]], 1)


def _sgd_stats_forloop(grp: SGDGroup, idx: list[int], ctx: _Ctx):
    part = sum(_sgd_stats_one(grp.params[i], grp.grads[i], grp.momentum_buffers[i], lam=grp.lam,
                              coef_a=_sgd_coef_a(grp), wd=grp.weight_decay, layer=grp.layers[i],
                              n_layers=ctx.n_layers, weight=grp.weights[i]) for i in idx)
    return part, None


def _sgd_apply_forloop(grp: SGDGroup, idx: list[int], scratch, ctx: _Ctx, beta: Tensor, skip):
    for i in idx:
        _write_param(grp, i, _sgd_apply_one(grp.params[i], grp.grads[i], grp.momentum_buffers[i],
                                            at_layer(beta, grp.layers[i]), lam=grp.lam, lr=grp.lr,
                                            wd=grp.weight_decay))


def _sgd_stats_foreach(grp: SGDGroup, idx: list[int], ctx: _Ctx):
    X = [_up(grp.params[i]) for i in idx]
    G = [_sgd_grad(X[k], _up(grp.grads[i]), grp.weight_decay) for k, i in enumerate(idx)]
    Dm = [_up(grp.momentum_buffers[i]) for i in idx]
    Delta = torch._foreach_sub(Dm, G)
    raw = torch.stack([torch.stack([_dot(G[k], Dm[k]), _dot(Delta[k], G[k]), _dot(Delta[k], Delta[k])])
                       for k in range(len(idx))])
    return _rows_to_layers(_sgd_rows(raw, grp), grp, idx, ctx.n_layers), (X, Dm, Delta)


def _sgd_apply_foreach(grp: SGDGroup, idx: list[int], scratch, ctx: _Ctx, beta: Tensor, skip):
    X, Dm, Delta = scratch
    # d ← ((β+λ)d + (1-β)g)/(1+λ) = d - (1-β)/(1+λ) δ
    torch._foreach_mul_(Delta, [(beta[grp.layers[i]] - 1) / (1 + grp.lam) for i in idx])
    torch._foreach_add_(Dm, Delta)
    torch._foreach_add_(X, Dm, alpha=-grp.lr)
    for k, i in enumerate(idx):
        _writeback(grp.momentum_buffers[i], Dm[k])
        _writeback(grp.params[i], X[k])


def _sgd_apply_mixed(grp: SGDGroup, idx: list[int], scratch, ctx: _Ctx, beta: Tensor, skip):
    """As ``_sgd_apply_foreach`` into new tensors, written back unless skipped (on the device);
    x rounded (stochastically for bf16 with a key)."""
    X, Dm, Delta = scratch
    torch._foreach_mul_(Delta, [(beta[grp.layers[i]] - 1) / (1 + grp.lam) for i in idx])
    Dn = torch._foreach_add(Dm, Delta)  # new tensors (Dm may be d itself)
    torch._foreach_add_(X, Dn, alpha=-grp.lr)  # X is an upcast copy: x itself is bf16/fp16
    for k, i in enumerate(idx):
        _keep(grp.momentum_buffers[i], Dn[k], skip)
        _keep(grp.params[i], rounding.round_to(grp.params[i].dtype, X[k], _sr_key(grp, i)), skip)


def _sgd_stats_cpp(grp: SGDGroup, idx: list[int], ctx: _Ctx):
    """Pass 1 of the C++ kernels; the bucket's tensor lists go into the scratch for pass 2."""
    xgd = [[lst[i] for i in idx] for lst in (grp.params, grp.grads, grp.momentum_buffers)]
    raw = _cpu_ext.load().sgd_pass1(*xgd, grp.weight_decay).to(ctx.dtype)
    return _rows_to_layers(_sgd_rows(raw, grp), grp, idx, ctx.n_layers), xgd


def _sgd_apply_cpp(grp: SGDGroup, idx: list[int], xgd, ctx: _Ctx, beta: Tensor, skip):
    """d ← d + (β-1)/(1+λ) δ, x ← x - η d (G = g + μx recomputed)."""
    coef = [(b - 1) / (1 + grp.lam) for b in _host_scalars(beta, grp.layers, idx)]
    _cpu_ext.load().sgd_pass2(*xgd, coef, grp.lr, grp.weight_decay, skip)


def _sgd_stats_triton(grp: SGDGroup, idx: list[int], ctx: _Ctx):
    """Pass 1 and the per-layer reduction: two launches."""
    xgd = [[lst[i] for i in idx] for lst in (grp.params, grp.grads, grp.momentum_buffers)]
    sums, meta = _triton.sgd_stats(*xgd, [grp.layers[i] for i in idx], [grp.weights[i] for i in idx],
                                   ctx.n_layers, wd=grp.weight_decay)
    sums = sums.to(ctx.dtype)
    return torch.cat([_sgd_rows(sums[:, :-1], grp), sums[:, -1:]], 1), meta


def _sgd_apply_triton(grp: SGDGroup, idx: list[int], meta, ctx: _Ctx, beta: Tensor, skip):
    _triton.sgd_apply(meta, grp.params[idx[0]].dtype, beta, skip, lam=grp.lam, lr=grp.lr, wd=grp.weight_decay)


#: AM-SGD's kernel paths: ``{impl: (stats, apply)}`` (no compiled kernels).
SGD_KERNELS = {
    "forloop": (_sgd_stats_forloop, _sgd_apply_forloop),
    "foreach": (_sgd_stats_foreach, _sgd_apply_foreach),
    "cpp": (_sgd_stats_cpp, _sgd_apply_cpp),
    "triton": (_sgd_stats_triton, _sgd_apply_triton),
    "mixed": (_sgd_stats_foreach, _sgd_apply_mixed),
}


#: The ``impl`` names ``am_sgd`` takes.
SGD_IMPLS = ("forloop", "foreach", "fused", "cpp", "triton")
assert set(SGD_IMPLS) == {"fused", *SGD_KERNELS} - {"mixed"}


def _sgd_buckets(grp: SGDGroup, have: list[int], impl: str) -> dict:
    """Buckets over the tensors that have a buffer (indices into the group's lists)."""
    sub = lambda lst: [lst[i] for i in have]  # noqa: E731
    others = (grp.grads, grp.momentum_buffers)
    buckets = _buckets(len(have), sub(grp.params), sub(grp.layers), impl, tuple(sub(o) for o in others),
                       SGD_KERNELS, [_needs_mixed(grp, i, others) for i in have])
    return {key: [have[j] for j in idx] for key, idx in buckets.items()}


def _sgd_stats(grp: SGDGroup, impl: str, ctx: _Ctx):
    """Partial sums over tensors that already have a buffer (new ones take d ← g)."""
    n = len(grp.params)
    if not grp.weights:
        grp.weights = [1.0] * n
    have = [i for i in range(n) if grp.momentum_buffers[i] is not None]
    packed = torch.zeros(ctx.n_layers, 4, dtype=ctx.dtype, device=ctx.device)
    for i in range(n):  # a tensor's first step adds no sums, but its layer is present
        if grp.momentum_buffers[i] is None:
            layer = grp.layers[i]
            if isinstance(layer, Tensor):
                counts = torch.bincount(layer, minlength=ctx.n_layers + 1)[:ctx.n_layers]
                packed[:, -1] += counts.to(ctx.device, ctx.dtype)
            else:
                packed[layer, -1] += grp.params[i].numel()
    buckets = _sgd_buckets(grp, have, impl)
    packed, scratch = _stats_of(SGD_KERNELS, grp, buckets, ctx, packed)
    return packed, (buckets, scratch)


def _sgd_apply(grp: SGDGroup, sc, ctx: _Ctx, beta: Tensor, skip: Optional[Tensor]):
    buckets, scratch = sc
    first = [i for i in range(len(grp.params)) if grp.momentum_buffers[i] is None]
    if first and _host_skip(skip):  # a host read, but only on the first step of some tensor
        first = []
    for i in first:  # first step of a tensor: d ← g, x ← x - η d
        x = grp.params[i]
        d = _sgd_grad(_up(x), _up(grp.grads[i]), grp.weight_decay).clone()
        _write_param(grp, i, _up(x) - grp.lr * d)
        lowp = grp.lowp_state_dtype if x.dtype in _LOWP and grp.lowp_state_dtype is not None else x.dtype
        grp.momentum_buffers[i] = d.to(lowp)
    _apply_of(SGD_KERNELS, grp, buckets, scratch, ctx, beta, skip)


def am_sgd(
    groups: list[SGDGroup],
    state: BetaState,
    cfg: BetaConfig,
    *,
    reduce: Reducer = None,
    impl: str = "foreach",
    force_beta: Optional[float] = None,
    found_inf: Optional[Tensor] = None,
    skip_nonfinite: bool = False,
) -> tuple[BetaState, Tensor, Optional[Tensor]]:
    """One AM-SGD step over all groups. New buffers are stored into ``momentum_buffers``.

    Returns the new β state, the packed sums ``[L, 4]`` = [A, B, C, count] and the skip
    flag (as ``am_adamw``; a skipped step creates no buffer).
    """
    ctx = _Ctx(state.pi.numel(), state.pi.dtype, state.pi.device)

    def num_den(packed):
        return packed[:, 0] - packed[:, 1], packed[:, 2]

    return _run(groups, state, cfg, 3, lambda g: _sgd_stats(g, impl, ctx), num_den,
                lambda g, s, b, sk: _sgd_apply(g, s, ctx, b, sk), reduce, force_beta, found_inf, skip_nonfinite)
