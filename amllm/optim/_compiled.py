"""The ``torch.compile``d two-pass path of AM-AdamW: ``fused=True`` on CPU where the C++
kernels of ``_cpu_ext.py`` cannot be built (on CUDA the multi-tensor Triton kernels of
``_triton.py`` run instead: this path costs two compiled calls per tensor, ~80 µs of host
time each); ``impl="compiled"`` forces it, as the tests do.

Per tensor, two fused element-wise kernels (Inductor: one C++/OpenMP loop on CPU, one
Triton kernel on CUDA), nothing but the state written back in place:

* pass 1 reads g, d, v, x; computes the new v (not stored: a step may still be skipped
  after the reduction); returns the five partial sums
  ``[Σ g·q, Σ δ·q, Σ w·δ·δ, Σ g·x, Σ δ·x]`` with q = d/p, δ = d - g, w = 1/(p(1+λp))
  (the same rows as the foreach path: A, B, C, D follow by exact algebra);
* (one reduction over tensors and ranks, then β on device — shared with the other paths;)
* pass 2 reads g, d, v, x; recomputes the new v; writes v, d and x (skipped steps do not
  call it: the caller reads the skip flag on the host, this being a fallback path).

p and w are recomputed from v in both passes, never stored: 11 passes over memory per
element against AdamW's 7, no temporaries. Both passes compute p from v *as stored*
(rounded to the parameter dtype for bf16/fp16), so the sums and the update of a step use
the same p.

Compilation: ``dynamic=True`` (one graph per dtype/device for all sizes; Inductor adds a
second one for small tensors), Python floats for lr/λ/μ/ε/β2 (dynamo treats floats as
symbolic, ``specialize_float=False``, so lr schedules never recompile), and 0-d device
tensors for c1, β and the bias correction 1/sqrt(c2) (from the step counter on device: no
host sync, no host-to-device copy). The first
use on a (device type, dtype) compiles on small dummy tensors; if that fails (no C++
compiler, no Triton, unsupported backend) a warning is issued once and the caller uses
the foreach path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._probe import check_once

_FNS: dict = {}
_STATUS: dict = {}  # (device type, dtype) -> True | error string


def _ct(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _p(v: Tensor, c1: Tensor, eps: float, inv_sqrt_c2: Tensor) -> Tensor:
    """p = c1 (sqrt(v/c2) + ε), from v as stored."""
    return c1 * (torch.sqrt(v.to(_ct(v))) * inv_sqrt_c2 + eps)


def _v_new(v: Tensor, G: Tensor, beta2: float) -> Tensor:
    """v ← β2 v + (1-β2) g², rounded to the storage dtype (both passes use it as stored)."""
    return (v.to(G.dtype) * beta2 + (1 - beta2) * G * G).to(v.dtype)


def adamw_pass1(x: Tensor, g: Tensor, d: Tensor, v: Tensor, c1: Tensor, beta2: float, eps: float,
                lam: float, inv_sqrt_c2: Tensor) -> Tensor:
    ct = _ct(v)
    X, G, Dm = x.to(ct), g.to(ct), d.to(ct)
    p = _p(_v_new(v, G, beta2), c1, eps, inv_sqrt_c2)
    u = 1 + lam * p
    inv = 1 / (p * u)  # w; one division for both w and 1/p = u·w
    delta = Dm - G
    q = Dm * u * inv  # d / p
    wdelta = delta * inv
    return torch.stack([(G * q).sum(), (delta * q).sum(), (wdelta * delta).sum(), (G * X).sum(),
                        (delta * X).sum()])


def adamw_pass2(x: Tensor, g: Tensor, d: Tensor, v: Tensor, c1: Tensor, beta: Tensor, beta2: float, eps: float,
                lam: float, inv_sqrt_c2: Tensor, lr: float, wd: float) -> None:
    ct = _ct(v)
    X, G, Dm = x.to(ct), g.to(ct), d.to(ct)
    v_new = _v_new(v, G, beta2)
    p = _p(v_new, c1, eps, inv_sqrt_c2)
    u = 1 + lam * p
    inv = 1 / (p * u)
    beta = beta.to(ct)
    d_new = (Dm * (beta + lam * p) + (1 - beta) * G) * (p * inv)  # / (1 + λp)
    x_new = X * (1 - lr * wd) - lr * d_new * (u * inv)  # x (1-ημ) - η d/p
    v.copy_(v_new)
    d.copy_(d_new.to(d.dtype))
    x.copy_(x_new.to(x.dtype))


def compiled(name: str):
    if name not in _FNS:
        fn = {"adamw_pass1": adamw_pass1, "adamw_pass2": adamw_pass2}[name]
        _FNS[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _FNS[name]


def usable() -> str | None:
    """None when this torch can run the path at all, else the reason it cannot."""
    if not hasattr(torch, "compile"):
        return "torch.compile is missing"
    try:
        import torch._dynamo.config as dcfg
    except Exception as e:  # pragma: no cover - broken installs
        return f"torch._dynamo unavailable: {e}"
    if getattr(dcfg, "specialize_float", True):
        return "torch._dynamo specialises Python floats (every lr change would recompile)"
    return None


def _probe(device: torch.device, dtype: torch.dtype) -> None:
    """Compile both passes on dummy tensors (raises if that fails)."""
    with torch.no_grad():
        for n in (64, 8192):  # both of Inductor's size regimes (small / cascade sums)
            x, g, d, v = (torch.rand(n, device=device, dtype=torch.float32).to(dtype) for _ in range(4))
            one = torch.ones((), device=device, dtype=_ct(x))
            adamw_sums = compiled("adamw_pass1")(x, g, d, v, one * 0.5, 0.99, 1e-8, 0.1, one)
            compiled("adamw_pass2")(x, g, d, v, one * 0.5, one * 0.5, 0.99, 1e-8, 0.1, one, 1e-3, 0.0)
            if not bool(torch.isfinite(adamw_sums).all()):
                raise RuntimeError("non-finite sums from the probe")


def available(device: torch.device, dtype: torch.dtype, warn: bool = True) -> bool:
    """Compile (once per device type and dtype) on dummy tensors; False if that fails."""
    def check():
        return usable() or _probe(device, dtype)

    return check_once(_STATUS, (device.type, dtype), "the compiled (fused) AM path is", f"{device.type}/{dtype}",
                      check, warn)


def flat(t: Tensor) -> Tensor:
    """A 1-D plain-tensor view sharing storage (callers route non-contiguous tensors elsewhere)."""
    return t.detach().view(-1)
