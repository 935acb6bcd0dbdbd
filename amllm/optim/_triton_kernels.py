"""The Triton kernels of ``_triton.py`` (see its docstring for the design).

Imported only by ``_triton.kernels()``, once per value of ``TRITON_INTERPRET`` (``triton.jit``
reads it when a function is decorated, and jitted helpers are looked up in module globals,
so each value gets its own module instance). The math is the spec's as rewritten in
``functional.py`` and ``csrc/am_cpu.cpp``; names: x param, g grad, d first moment,
v second moment, p = c1 (sqrt(v) isc2 + ε), u = 1 + λp, inv = 1/(p u) = w.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _tensor(chunk_t):
    """The index of this program's tensor."""
    return tl.load(chunk_t + tl.program_id(0))


@triton.jit
def _span(chunk_t, chunk_s, numel, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """(tensor index, first element, end) of this program's chunk. ``ALIGNED``: the host
    checked that this tensor's addresses are 16-byte aligned and its size a multiple of 16
    elements; with these hints (and ``_ptr``'s) loads and stores compile to 128-bit accesses,
    without them to one access per element (values loaded from a table carry no alignment).
    Loaded here, in the body that uses them: a hint marks the op that defines a value, so the
    aligned and the per-element body need values of their own."""
    pid = tl.program_id(0)
    t = tl.load(chunk_t + pid)
    start = tl.load(chunk_s + pid)
    end = tl.minimum(start + CHUNK, tl.load(numel + t))
    if ALIGNED:
        start = tl.multiple_of(start, 16)
        end = tl.multiple_of(end, 16)
    return t, start, end


@triton.jit
def _isc2(steps, t, log_beta2):
    """1/sqrt(1 - β2^(step+1)) from the tensor's step counter (float64: c2 ≈ 1e-3 at t = 1)."""
    step = tl.load(tl.load(steps + t).to(tl.pointer_type(tl.float32))).to(tl.float64) + 1.0
    return 1.0 / tl.sqrt(1.0 - tl.exp(step * log_beta2))


@triton.jit
def _rnd(x, DT: tl.constexpr, FIX_BF16: tl.constexpr):
    """x rounded to the storage dtype, to nearest even. Triton 3.6's interpreter truncates
    float32 -> bfloat16 (compiled code rounds to nearest even), so under the interpreter
    (``FIX_BF16``) the rounding is done on the bits first, the conversion is then exact."""
    if FIX_BF16 and DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DT)


@triton.jit
def _ld(ptr, o, m, CT: tl.constexpr):
    """Masked lanes read 0 (they then add 0 to every sum), converted to the compute type."""
    return tl.load(ptr + o, mask=m, other=0.0).to(CT)


@triton.jit
def _ptr(table, t, DT: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.load(table + t).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _adamw_p(v, g, c1v, isc2, beta2, omb2, eps, lam, DT: tl.constexpr, FIX_BF16: tl.constexpr):
    """Both passes: the new v as stored (storage dtype), and from it p, u = 1 + λp, inv = 1/(p u) = w."""
    vs = _rnd(v * beta2 + omb2 * g * g, DT, FIX_BF16)
    p = c1v * (tl.sqrt(vs.to(g.dtype)) * isc2 + eps)
    u = 1.0 + lam * p
    return vs, p, u, 1.0 / (p * u)


# Per-tensor alignment: every kernel takes ``ALIGN``, the bucket's mode, and ``align``, a flag per
# tensor. ALIGN = 1: every tensor is aligned (only the 128-bit body is compiled); 0: none is (only
# the per-element body); 2: mixed, both bodies are compiled and each program takes its tensor's
# (a branch on a value uniform over the program: no divergence). So one unaligned tensor (a ZeRO
# fragment at an odd offset) no longer costs its whole bucket the vectorised accesses.


@triton.jit
def _adamw_sums(xs, gs, ds, vs, numel, chunk_t, chunk_s, c1v, isc2, beta2, omb2, eps, lam,
                WITH_X: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                FIX_BF16: tl.constexpr, ALIGNED: tl.constexpr):
    """Pass 1 over this program's chunk: Σg·q, Σδ·q, Σwδ², Σg·x, Σδ·x (the last two 0 without WITH_X)."""
    t, start, end = _span(chunk_t, chunk_s, numel, CHUNK, ALIGNED)
    xp, gp = _ptr(xs, t, DT, ALIGNED), _ptr(gs, t, DT, ALIGNED)
    dp, vp = _ptr(ds, t, DT, ALIGNED), _ptr(vs, t, DT, ALIGNED)
    z = tl.zeros([BLOCK], CT)  # per-lane partial sums (values: rebinding never aliases)
    s0, s1, s2, s3, s4 = z, z, z, z, z
    for off in range(start, end, BLOCK):
        o = off + tl.arange(0, BLOCK)
        m = o < end
        g = _ld(gp, o, m, CT)
        d = _ld(dp, o, m, CT)
        # p from v as pass 2 will store it (v itself is not written here: the step may be skipped)
        _, p, u, inv = _adamw_p(_ld(vp, o, m, CT), g, c1v, isc2, beta2, omb2, eps, lam, DT, FIX_BF16)
        delta = d - g
        q = d * u * inv  # masked lanes: g = d = 0, p = c1 ε > 0 -> every term 0
        s0 += g * q
        s1 += delta * q
        s2 += delta * inv * delta
        if WITH_X:
            x = _ld(xp, o, m, CT)
            s3 += g * x
            s4 += delta * x
    return tl.sum(s0, 0), tl.sum(s1, 0), tl.sum(s2, 0), tl.sum(s3, 0), tl.sum(s4, 0)


@triton.jit
def adamw_pass1(xs, gs, ds, vs, steps, numel, layer, chunk_t, chunk_s, align, c1, part,
                log_beta2, beta2, omb2, eps, lam,
                WITH_X: tl.constexpr, K: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr, FIX_BF16: tl.constexpr, ALIGN: tl.constexpr):
    t = _tensor(chunk_t)
    c1v = tl.load(c1 + tl.load(layer + t)).to(CT)
    isc2 = _isc2(steps, t, log_beta2).to(CT)
    if ALIGN == 2:  # per tensor: a branch uniform over the program
        if tl.load(align + t) != 0:
            s0, s1, s2, s3, s4 = _adamw_sums(xs, gs, ds, vs, numel, chunk_t, chunk_s, c1v, isc2, beta2, omb2, eps, lam,
                                             WITH_X, DT, CT, CHUNK, BLOCK, FIX_BF16, True)
        else:
            s0, s1, s2, s3, s4 = _adamw_sums(xs, gs, ds, vs, numel, chunk_t, chunk_s, c1v, isc2, beta2, omb2, eps, lam,
                                             WITH_X, DT, CT, CHUNK, BLOCK, FIX_BF16, False)
    elif ALIGN == 1:
        s0, s1, s2, s3, s4 = _adamw_sums(xs, gs, ds, vs, numel, chunk_t, chunk_s, c1v, isc2, beta2, omb2, eps, lam,
                                         WITH_X, DT, CT, CHUNK, BLOCK, FIX_BF16, True)
    else:
        s0, s1, s2, s3, s4 = _adamw_sums(xs, gs, ds, vs, numel, chunk_t, chunk_s, c1v, isc2, beta2, omb2, eps, lam,
                                         WITH_X, DT, CT, CHUNK, BLOCK, FIX_BF16, False)
    out = part + tl.program_id(0) * K  # K = 5 with x, else 3
    tl.store(out, s0)
    tl.store(out + 1, s1)
    tl.store(out + 2, s2)
    if WITH_X:
        tl.store(out + 3, s3)
        tl.store(out + 4, s4)


@triton.jit
def _adamw_update(xs, gs, ds, vs, numel, chunk_t, chunk_s, skip, c1v, b, isc2, beta2, omb2, eps, lam, lr, decay,
                  HAS_SKIP: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr, FIX_BF16: tl.constexpr, ALIGNED: tl.constexpr):
    """Pass 2 over this program's chunk: v, d, x written (nothing on a skipped step)."""
    t, start, end = _span(chunk_t, chunk_s, numel, CHUNK, ALIGNED)
    if HAS_SKIP:
        if tl.load(skip) != 0:
            end = start  # skipped step: no element is read or written
    xp, gp = _ptr(xs, t, DT, ALIGNED), _ptr(gs, t, DT, ALIGNED)
    dp, vp = _ptr(ds, t, DT, ALIGNED), _ptr(vs, t, DT, ALIGNED)
    for off in range(start, end, BLOCK):
        o = off + tl.arange(0, BLOCK)
        m = o < end
        x = _ld(xp, o, m, CT)
        g = _ld(gp, o, m, CT)
        d = _ld(dp, o, m, CT)
        vs_, p, u, inv = _adamw_p(_ld(vp, o, m, CT), g, c1v, isc2, beta2, omb2, eps, lam, DT, FIX_BF16)
        dn = (d * (b + lam * p) + (1.0 - b) * g) * (p * inv)  # / (1 + λp)
        tl.store(vp + o, vs_, mask=m)
        tl.store(dp + o, _rnd(dn, DT, FIX_BF16), mask=m)
        tl.store(xp + o, _rnd(x * decay - lr * dn * (u * inv), DT, FIX_BF16), mask=m)  # x(1-ημ) - η d/p


@triton.jit
def adamw_pass2(xs, gs, ds, vs, steps, numel, layer, chunk_t, chunk_s, align, c1, beta, skip,
                log_beta2, beta2, omb2, eps, lam, lr, decay,
                HAS_SKIP: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr, FIX_BF16: tl.constexpr, ALIGN: tl.constexpr):
    t = _tensor(chunk_t)
    li = tl.load(layer + t)
    c1v = tl.load(c1 + li).to(CT)
    b = tl.load(beta + li).to(CT)
    isc2 = _isc2(steps, t, log_beta2).to(CT)
    if ALIGN == 2:  # per tensor: a branch uniform over the program
        if tl.load(align + t) != 0:
            _adamw_update(xs, gs, ds, vs, numel, chunk_t, chunk_s, skip, c1v, b, isc2, beta2, omb2, eps, lam, lr,
                          decay, HAS_SKIP, DT, CT, CHUNK, BLOCK, FIX_BF16, True)
        else:
            _adamw_update(xs, gs, ds, vs, numel, chunk_t, chunk_s, skip, c1v, b, isc2, beta2, omb2, eps, lam, lr,
                          decay, HAS_SKIP, DT, CT, CHUNK, BLOCK, FIX_BF16, False)
    elif ALIGN == 1:
        _adamw_update(xs, gs, ds, vs, numel, chunk_t, chunk_s, skip, c1v, b, isc2, beta2, omb2, eps, lam, lr,
                      decay, HAS_SKIP, DT, CT, CHUNK, BLOCK, FIX_BF16, True)
    else:
        _adamw_update(xs, gs, ds, vs, numel, chunk_t, chunk_s, skip, c1v, b, isc2, beta2, omb2, eps, lam, lr,
                      decay, HAS_SKIP, DT, CT, CHUNK, BLOCK, FIX_BF16, False)


@triton.jit
def _sgd_sums(xs, gs, ds, numel, chunk_t, chunk_s, wd,
              WITH_X: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
              ALIGNED: tl.constexpr):
    """Pass 1 over this program's chunk: Σ G·d, Σ δ·G, Σ δ·δ."""
    t, start, end = _span(chunk_t, chunk_s, numel, CHUNK, ALIGNED)
    xp, gp, dp = _ptr(xs, t, DT, ALIGNED), _ptr(gs, t, DT, ALIGNED), _ptr(ds, t, DT, ALIGNED)
    z = tl.zeros([BLOCK], CT)
    s0, s1, s2 = z, z, z
    for off in range(start, end, BLOCK):
        o = off + tl.arange(0, BLOCK)
        m = o < end
        g = _ld(gp, o, m, CT)
        if WITH_X:
            g += wd * _ld(xp, o, m, CT)  # G = g + μx (coupled)
        d = _ld(dp, o, m, CT)
        delta = d - g
        s0 += g * d
        s1 += delta * g
        s2 += delta * delta
    return tl.sum(s0, 0), tl.sum(s1, 0), tl.sum(s2, 0)


@triton.jit
def sgd_pass1(xs, gs, ds, numel, chunk_t, chunk_s, align, part, wd,
              WITH_X: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr,
              BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    t = _tensor(chunk_t)
    if ALIGN == 2:  # per tensor: a branch uniform over the program
        if tl.load(align + t) != 0:
            s0, s1, s2 = _sgd_sums(xs, gs, ds, numel, chunk_t, chunk_s, wd, WITH_X, DT, CT, CHUNK, BLOCK, True)
        else:
            s0, s1, s2 = _sgd_sums(xs, gs, ds, numel, chunk_t, chunk_s, wd, WITH_X, DT, CT, CHUNK, BLOCK, False)
    elif ALIGN == 1:
        s0, s1, s2 = _sgd_sums(xs, gs, ds, numel, chunk_t, chunk_s, wd, WITH_X, DT, CT, CHUNK, BLOCK, True)
    else:
        s0, s1, s2 = _sgd_sums(xs, gs, ds, numel, chunk_t, chunk_s, wd, WITH_X, DT, CT, CHUNK, BLOCK, False)
    out = part + tl.program_id(0) * 3
    tl.store(out, s0)
    tl.store(out + 1, s1)
    tl.store(out + 2, s2)


@triton.jit
def _sgd_update(xs, gs, ds, numel, chunk_t, chunk_s, skip, coef, lr, wd,
                HAS_SKIP: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr, FIX_BF16: tl.constexpr, ALIGNED: tl.constexpr):
    """Pass 2 over this program's chunk: d, x written (nothing on a skipped step)."""
    t, start, end = _span(chunk_t, chunk_s, numel, CHUNK, ALIGNED)
    if HAS_SKIP:
        if tl.load(skip) != 0:
            end = start
    xp, gp, dp = _ptr(xs, t, DT, ALIGNED), _ptr(gs, t, DT, ALIGNED), _ptr(ds, t, DT, ALIGNED)
    for off in range(start, end, BLOCK):
        o = off + tl.arange(0, BLOCK)
        m = o < end
        x = _ld(xp, o, m, CT)
        g = _ld(gp, o, m, CT) + wd * x
        d = _ld(dp, o, m, CT)
        dn = d + coef * (d - g)  # ((β+λ)d + (1-β)G)/(1+λ)
        tl.store(dp + o, _rnd(dn, DT, FIX_BF16), mask=m)
        tl.store(xp + o, _rnd(x - lr * dn, DT, FIX_BF16), mask=m)


@triton.jit
def sgd_pass2(xs, gs, ds, numel, layer, chunk_t, chunk_s, align, beta, skip, lam, lr, wd,
              HAS_SKIP: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr,
              BLOCK: tl.constexpr, FIX_BF16: tl.constexpr, ALIGN: tl.constexpr):
    t = _tensor(chunk_t)
    coef = (tl.load(beta + tl.load(layer + t)).to(CT) - 1.0) / (1.0 + lam)
    if ALIGN == 2:  # per tensor: a branch uniform over the program
        if tl.load(align + t) != 0:
            _sgd_update(xs, gs, ds, numel, chunk_t, chunk_s, skip, coef, lr, wd,
                        HAS_SKIP, DT, CT, CHUNK, BLOCK, FIX_BF16, True)
        else:
            _sgd_update(xs, gs, ds, numel, chunk_t, chunk_s, skip, coef, lr, wd,
                        HAS_SKIP, DT, CT, CHUNK, BLOCK, FIX_BF16, False)
    elif ALIGN == 1:
        _sgd_update(xs, gs, ds, numel, chunk_t, chunk_s, skip, coef, lr, wd,
                    HAS_SKIP, DT, CT, CHUNK, BLOCK, FIX_BF16, True)
    else:
        _sgd_update(xs, gs, ds, numel, chunk_t, chunk_s, skip, coef, lr, wd,
                    HAS_SKIP, DT, CT, CHUNK, BLOCK, FIX_BF16, False)


@triton.jit
def layer_sums(part, order, lstart, wchunk, counts, out,
               K: tl.constexpr, KP: tl.constexpr, RB: tl.constexpr):
    layer = tl.program_id(0)
    lo = tl.load(lstart + layer)
    hi = tl.load(lstart + layer + 1)
    cols = tl.arange(0, KP)
    acc = tl.zeros([RB, KP], tl.float64)
    for i in range(lo, hi, RB):
        r = i + tl.arange(0, RB)
        rm = r < hi
        c = tl.load(order + r, mask=rm, other=0)
        w = tl.load(wchunk + c, mask=rm, other=0.0)
        v = tl.load(part + c[:, None] * K + cols[None, :], mask=rm[:, None] & (cols[None, :] < K), other=0.0)
        acc += v.to(tl.float64) * w[:, None]
    row = out + layer * (K + 1)
    tl.store(row + cols, tl.sum(acc, 0), mask=cols < K)
    tl.store(row + K, tl.load(counts + layer))

DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
          torch.float16: tl.float16}
