"""Multi-tensor Triton kernels of AM-AdamW and AM-SGD: the accelerator (CUDA) path.

One launch per pass for every tensor of a bucket (one param group's tensors of one device
and dtype), however many tensors it holds, as apex's ``multi_tensor_apply``: the kernels
get a table of tensor addresses (int64 ``data_ptr()``s) and a chunk table; program ``i``
handles chunk ``i`` = (tensor index, first element), ``CHUNK`` elements of one tensor,
walked ``BLOCK`` lanes at a time. A step of a bucket is three launches:

1. pass 1 (``*_pass1``): reads g, d (and v, and x with weight decay); computes the new v in
   registers (written in pass 2 only, so that a step can still be skipped after the
   reduction); writes ``K`` float32 (float64 for float64 params) partial sums per chunk;
2. ``layer_sums``: one program per layer adds its chunks' partials in float64, in a fixed
   order (chunk rows sorted by layer, RBLOCK lanes, then a tree), per-tensor weights
   applied, the layer's element count in the last column. No atomics: the result is
   bit-reproducible for given shapes;
3. pass 2 (``*_pass2``): reads x, g, d, v; recomputes v and p; writes v, d, x. The skip
   flag (``found_inf`` / non-finite sums) is loaded in the kernel: a skipped step makes
   every program exit before touching memory, with no host read.

Per-tensor and per-layer scalars come from device memory, indexed in the kernel: c1 and β
by the tensor's layer id, the bias correction 1/sqrt(1 - β2^t) from the tensor's step
counter (``state["step"]``, a 0-d float32 tensor on the parameter's device; its address is
in the table). Nothing per tensor crosses from the host in steady state.

Why chunks of ``CHUNK`` elements: a tensor of n elements gets ceil(n / CHUNK) programs, so a
65M-element embedding's sums run on thousands of programs in parallel (no reliance on a
compiler's split heuristic), while the chunk table stays small (1B parameters: ~122k rows,
so the final reduction reads ~2.4 MB). Small tensors take one program each, most lanes
masked: their cost is the launch they share with all others.

Alignment is decided per tensor: a tensor whose addresses are 16-byte aligned and whose size
is a multiple of 16 elements gets 128-bit loads and stores, the others one access per element,
in the same launch (see ``_triton_kernels.py``).

Tables (pointers, chunk table, layer ids, weights, counts, alignment flags) are cached by the
addresses and sizes they describe (``_tables.cached``) and uploaded through pinned memory without a
synchronising copy when they change.

Kernels are defined on first use, per value of ``TRITON_INTERPRET`` (the interpreter runs
them on CPU tensors: tests and the CPU benchmark). Triton missing, or a failing probe on
first use, warns once and the caller takes the foreach path.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..debug import host_side
from . import _tables
from ._probe import check_once

CHUNK = 8192  # elements per program (see the module docstring)
BLOCK = 1024  # lanes per inner iteration: 8 fp32 per thread at 4 warps
RBLOCK = 512  # chunk rows per iteration of the final per-layer reduction
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: Kernel launches so far (the tests and the benchmark read differences of it).
launches = 0

_KERNELS: dict = {}
_STATUS: dict = {}  # (device type, interpret, dtype) -> True | reason


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _define() -> dict:
    """A fresh instance of ``_triton_kernels`` (its own globals: see that module's docstring)."""
    path = Path(__file__).resolve().parent / "_triton_kernels.py"
    spec = importlib.util.spec_from_file_location(f"amllm.optim._triton_kernels_i{int(interpret())}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(adamw_pass1=mod.adamw_pass1, adamw_pass2=mod.adamw_pass2, sgd_pass1=mod.sgd_pass1,
                sgd_pass2=mod.sgd_pass2, layer_sums=mod.layer_sums, dtypes=mod.DTYPES)


def kernels() -> dict:
    """The jitted kernels for the current ``TRITON_INTERPRET`` value (defined on first use)."""
    key = interpret()
    if key not in _KERNELS:
        _KERNELS[key] = _define()
    return _KERNELS[key]


def _launch(name: str, grid: int, device: torch.device, *args, **meta) -> None:
    global launches
    launches += 1
    k = kernels()[name]
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            k[(grid,)](*args, **meta)
    elif device.type == "cpu":  # the interpreter: its numpy internals warn (NumPy 1.25 deprecations)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            k[(grid,)](*args, **meta)
    else:
        k[(grid,)](*args, **meta)


# ----------------------------------------------------------------------------- tables


@dataclass
class Meta:
    """Device tables of one bucket (views into one int64 and one float64 upload)."""

    ptrs: list  # one [n] int64 view per tensor list (x, g, d[, v][, step counters])
    numel: Tensor
    layer: Tensor
    chunk_t: Tensor
    chunk_s: Tensor
    order: Tensor  # chunk rows sorted by layer (stable)
    lstart: Tensor  # [L + 1] first row of each layer in ``order``
    wchunk: Tensor  # float64 weight of each chunk's tensor
    counts: Tensor  # float64 element count per layer
    align: Tensor  # per tensor: 1 if its addresses are 16-byte aligned and its size a multiple of 16
    n_chunks: int
    n_layers: int
    align_mode: int  # the kernels' ALIGN: 1 every tensor aligned, 0 none, 2 mixed (per-tensor branch)
    host: tuple = ()  # pinned staging copies, alive while the entry is cached


def metadata(lists: list[list[Tensor]], layers: list[int], weights: list[float], n_layers: int,
             device: torch.device) -> Meta:
    """The tables for tensors ``lists[j][k]`` (aligned lists; ``lists[0]`` gives the sizes)."""
    key = ("triton", str(device), n_layers, tuple(layers), tuple(weights),
           tuple(t.numel() for t in lists[0]), tuple(t.data_ptr() for lst in lists for t in lst))
    return _tables.cached(key, lambda: _build(lists, layers, weights, n_layers, device))


def _build(lists, layers, weights, n_layers, device) -> Meta:
    with host_side():  # CPU tables, uploaded once (pinned, asynchronous): nothing here waits for the device
        return _build_tables(lists, layers, weights, n_layers, device)


def _build_tables(lists, layers, weights, n_layers, device) -> Meta:
    n = len(lists[0])
    numel = torch.tensor([t.numel() for t in lists[0]], dtype=torch.int64)
    per = (numel + CHUNK - 1) // CHUNK
    n_chunks = int(sum(-(-t.numel() // CHUNK) for t in lists[0]))
    chunk_t = torch.repeat_interleave(torch.arange(n), per, output_size=n_chunks)
    first = torch.cumsum(per, 0) - per
    chunk_s = (torch.arange(n_chunks) - first[chunk_t]) * CHUNK
    layer = torch.tensor(layers, dtype=torch.int64)
    layer_c = layer[chunk_t]
    order = torch.argsort(layer_c, stable=True)
    per_layer = torch.bincount(layer_c, minlength=n_layers)
    lstart = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(per_layer, 0)])
    ptrs = [torch.tensor([t.data_ptr() for t in lst], dtype=torch.int64) for lst in lists]
    counts = torch.zeros(n_layers, dtype=torch.float64).index_add_(0, layer, numel.double())
    # 128-bit accesses per tensor: all its addresses (x, g, d[, v]) 16-byte aligned, its size a
    # multiple of 16 elements (step counters are not element arrays)
    flags = [all(lst[k].data_ptr() % 16 == 0 for lst in lists[:4]) and lists[0][k].numel() % 16 == 0
             for k in range(n)]
    mode = 1 if all(flags) else 2 if any(flags) else 0
    align = torch.tensor(flags, dtype=torch.int64)
    # One upload per dtype; every table padded to 16 bytes, so that every view is 16-byte
    # aligned: Triton specialises a kernel on each pointer argument's alignment, and tables
    # at arbitrary offsets would compile many variants of each kernel.
    ints, int_views = _packed([*ptrs, numel, layer, chunk_t, chunk_s, order, lstart, align], device)
    flts, (wchunk, counts) = _packed([torch.tensor(weights, dtype=torch.float64)[chunk_t], counts], device)
    k = len(lists)
    return Meta(ptrs=int_views[:k], numel=int_views[k], layer=int_views[k + 1], chunk_t=int_views[k + 2],
                chunk_s=int_views[k + 3], order=int_views[k + 4], lstart=int_views[k + 5], wchunk=wchunk,
                counts=counts, align=int_views[k + 6], n_chunks=n_chunks, n_layers=n_layers, align_mode=mode,
                host=(ints,))


def _packed(tables: list[Tensor], device) -> tuple[Tensor, list[Tensor]]:
    """The 8-byte ``tables`` in one device tensor (one upload), each padded to an even length;
    returns (the host tensor, the device views)."""
    padded = [torch.cat([t, t.new_zeros(t.numel() % 2)]) for t in tables]
    host = torch.cat(padded)
    dev = _tables.upload(host, device)
    views = [v[:t.numel()] for v, t in zip(torch.split(dev, [p.numel() for p in padded]), tables)]
    return host, views


def _types(dtype: torch.dtype):
    tl_dt = kernels()["dtypes"]
    return tl_dt[dtype], tl_dt[torch.float64 if dtype == torch.float64 else torch.float32]


def _reduce(meta: Meta, part: Tensor, k: int, device) -> Tensor:
    """Chunk partials ``[C, k]`` -> ``[L, k + 1]`` float64 (weights applied, counts last)."""
    out = torch.empty(meta.n_layers, k + 1, dtype=torch.float64, device=device)
    _launch("layer_sums", meta.n_layers, device, part, meta.order, meta.lstart, meta.wchunk, meta.counts, out,
            K=k, KP=8, RB=RBLOCK)
    return out


def _log(beta2: float) -> float:
    return math.log(beta2) if beta2 > 0 else float("-inf")


# ----------------------------------------------------------------------------- AM-AdamW


def adamw_stats(xs, gs, ds, vs, steps, layers, weights, n_layers, c1: Tensor, *, beta2, eps, lam, with_x):
    """Pass 1 + reduction: ``([L, k+1]`` float64 raw sums Σgq, Σδq, C[, Σgx, Σδx] + count, tables)``."""
    t0 = xs[0]
    meta = metadata([xs, gs, ds, vs, steps], layers, weights, n_layers, t0.device)
    dt, ct = _types(t0.dtype)
    k = 5 if with_x else 3
    part = torch.empty(meta.n_chunks, k, dtype=torch.float64 if t0.dtype == torch.float64 else torch.float32,
                       device=t0.device)
    if meta.n_chunks:
        _launch("adamw_pass1", meta.n_chunks, t0.device, *meta.ptrs, meta.numel, meta.layer, meta.chunk_t,
                meta.chunk_s, meta.align, c1, part, _log(beta2), float(beta2), 1.0 - beta2, float(eps), float(lam),
                WITH_X=with_x, K=k, DT=dt, CT=ct, CHUNK=CHUNK, BLOCK=BLOCK, FIX_BF16=interpret(),
                ALIGN=meta.align_mode, num_warps=4)
    return _reduce(meta, part, k, t0.device), meta


def adamw_apply(meta: Meta, dtype, c1: Tensor, beta: Tensor, skip, *, beta2, eps, lam, lr, wd) -> None:
    if not meta.n_chunks:
        return
    dt, ct = _types(dtype)
    _launch("adamw_pass2", meta.n_chunks, meta.numel.device, *meta.ptrs, meta.numel, meta.layer, meta.chunk_t,
            meta.chunk_s, meta.align, c1, beta, c1 if skip is None else skip, _log(beta2), float(beta2),
            1.0 - beta2, float(eps), float(lam), float(lr), 1.0 - lr * wd,
            HAS_SKIP=skip is not None, DT=dt, CT=ct, CHUNK=CHUNK, BLOCK=BLOCK, FIX_BF16=interpret(),
            ALIGN=meta.align_mode, num_warps=4)


# ----------------------------------------------------------------------------- AM-SGD


def sgd_stats(xs, gs, ds, layers, weights, n_layers, *, wd):
    """Pass 1 + reduction: ``([L, 4]`` float64 raw sums Σ G·d, Σ δ·G, Σ δ·δ + count, tables)``."""
    t0 = xs[0]
    meta = metadata([xs, gs, ds], layers, weights, n_layers, t0.device)
    dt, ct = _types(t0.dtype)
    part = torch.empty(meta.n_chunks, 3, dtype=torch.float64 if t0.dtype == torch.float64 else torch.float32,
                       device=t0.device)
    if meta.n_chunks:
        _launch("sgd_pass1", meta.n_chunks, t0.device, *meta.ptrs, meta.numel, meta.chunk_t, meta.chunk_s,
                meta.align, part, float(wd), WITH_X=wd != 0, DT=dt, CT=ct, CHUNK=CHUNK, BLOCK=BLOCK,
                ALIGN=meta.align_mode, num_warps=4)
    return _reduce(meta, part, 3, t0.device), meta


def sgd_apply(meta: Meta, dtype, beta: Tensor, skip, *, lam, lr, wd) -> None:
    if not meta.n_chunks:
        return
    dt, ct = _types(dtype)
    _launch("sgd_pass2", meta.n_chunks, meta.numel.device, *meta.ptrs, meta.numel, meta.layer, meta.chunk_t,
            meta.chunk_s, meta.align, beta, beta if skip is None else skip, float(lam), float(lr), float(wd),
            HAS_SKIP=skip is not None, DT=dt, CT=ct, CHUNK=CHUNK, BLOCK=BLOCK, FIX_BF16=interpret(),
            ALIGN=meta.align_mode, num_warps=4)


# ----------------------------------------------------------------------------- availability


def _probe(device: torch.device, dtype: torch.dtype) -> None:
    """Both optimizers' kernels on two tiny tensors vs the same math in torch (raises on mismatch)."""
    gen = torch.Generator().manual_seed(0)
    x, g, d, v = (torch.rand(2, 37, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(4))
    step = torch.zeros((), dtype=torch.float32, device=device)
    c1 = torch.full((1,), 0.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    xs, gs, ds, vs = ([t[0], t[1]] for t in (x, g, d, v))
    sums, meta = adamw_stats(xs, gs, ds, vs, [step, step], [0, 0], [1.0, 1.0], 1, c1, beta2=0.5, eps=1e-8,
                             lam=0.0, with_x=False)
    ref = (g.double() * d.double() / (0.5 * ((0.5 * v.double() + 0.5 * g.double() ** 2).sqrt() / math.sqrt(0.5))))
    if not torch.allclose(sums[0, 0].cpu(), ref.sum().cpu(), rtol=1e-2):
        raise RuntimeError(f"probe: Σ g·d/p = {float(sums[0, 0])}, expected {float(ref.sum())}")
    adamw_apply(meta, dtype, c1, c1, None, beta2=0.5, eps=1e-8, lam=0.0, lr=0.0, wd=0.0)
    s, m = sgd_stats(xs, gs, ds, [0, 0], [1.0, 1.0], 1, wd=0.0)
    sgd_apply(m, dtype, c1, None, lam=0.0, lr=0.0, wd=0.0)
    if not bool(torch.isfinite(s).all()):
        raise RuntimeError("probe: non-finite AM-SGD sums")


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cpu" and not interpret():
        return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception as e:
        return f"triton is not importable ({type(e).__name__}: {e})"
    if isinstance(tl.sum, InterpretedFunction) != interpret():
        # triton decorates its own library (tl.sum, ...) when first imported
        return (f"triton was first imported with TRITON_INTERPRET={'1' if not interpret() else 'unset'}; "
                f"set the variable before anything imports triton")
    return None


def available(device: torch.device, dtype: torch.dtype, warn: bool = True) -> bool:
    """Whether the kernels serve this device and dtype (defined and probed once per key)."""
    if dtype not in _DTYPES:
        return False

    def check():
        return unavailable_reason(device) or _probe(device, dtype)

    return check_once(_STATUS, (device.type, interpret(), dtype), "the Triton multi-tensor kernels are",
                      f"{device.type}/{dtype}", check, warn)
