"""Stochastic rounding of float32 values to bfloat16, reproducible and free of host reads.

Why: with bf16 parameters and no float32 master copy, an update smaller than half the bf16
spacing around a weight is lost under round-to-nearest: a weight at 1.0 (spacing 2^-7 above,
2^-8 below) does not move under 100 updates of -1e-3. Stochastic rounding (SR) rounds
up with probability equal to the remainder's fraction of the spacing, so the rounded value is
unbiased, E[SR(x)] = x, and small updates accumulate in expectation.

Algorithm (float32 -> bfloat16, the upper 16 bits of a float32)::

    bits  = the float32's bit pattern (int32)
    r     = 16 uniform random bits, 0 <= r < 2^16
    out   = bfloat16 from (bits + r) with the low 16 bits cleared

Adding r to the bit pattern carries into bit 16 exactly when r >= 2^16 - low16(bits), i.e.
with probability low16(bits) / 2^16, the remainder's fraction of the spacing. The magnitude
is rounded away from zero in that case (sign-magnitude format), so negative values are
unbiased too. Values within the top spacing of the largest finite bf16 may round to inf;
inf stays inf; NaN stays NaN or becomes inf.

The random bits come from a counter-based generator: a 32-bit integer hash of the element's
flat index and a per-tensor key, ``tensor_key(seed, step, index)``, itself a hash of the
optimizer's ``sr_seed``, its SR step counter and the tensor's index among the optimizer's
parameters. So a step's bits depend only on these integers: the same on every device and
every kernel path, reproducible from a checkpoint (the counter is saved in the state dict),
and computed with integer tensor ops on the device (no generator state, no host read).
Integer arithmetic is int64 emulating uint32 with every product below 2^63 (no overflow).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # odd: i -> i * GOLDEN mod 2^32 is a bijection (distinct inputs per element)
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3's fmix32 constants
_CHUNK = 1 << 24  # elements per slice of a large tensor (bounds the int64 temporaries: 128 MiB)


def _mul32(h, c: int):
    """(h * c) mod 2^32 for 0 <= h < 2^32 (int or int64 tensor), products split below 2^49."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h):
    """murmur3's 32-bit finaliser (a bijection of [0, 2^32) with full avalanche)."""
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def tensor_key(seed: int, step: int, index: int) -> int:
    """The 32-bit key of one tensor on one step (host integers only)."""
    h = _fmix32(seed & _M32) ^ ((seed >> 32) & _M32)
    h = _fmix32(h ^ (step & _M32)) ^ ((step >> 32) & _M32)
    return _fmix32(_fmix32(h) ^ (index & _M32))


def random_bits(n: int, key: int, device, start: int = 0) -> Tensor:
    """16 uniform random bits per element ``start .. start+n-1`` of a tensor with ``key``: int32 ``[n]``."""
    i = torch.arange(start, start + n, dtype=torch.int64, device=device)
    h = _fmix32((_mul32(i, _GOLDEN) + key) & _M32)
    return (h >> 16).to(torch.int32)


def stochastic_round(src: Tensor, key: int) -> Tensor:
    """``src`` (float32) rounded stochastically to a new bfloat16 tensor of the same shape."""
    src = src.to(torch.float32).contiguous()
    flat = src.view(-1).view(torch.int32)
    out = torch.empty(src.shape, dtype=torch.bfloat16, device=src.device)
    dst = out.view(-1)
    for s in range(0, flat.numel(), _CHUNK):
        bits = flat[s:s + _CHUNK]
        r = random_bits(bits.numel(), key, src.device, start=s)
        dst[s:s + _CHUNK] = ((bits + r) & -65536).view(torch.float32)  # low 16 bits zero: exact in bf16
    return out


def round_to(dtype: torch.dtype, src: Tensor, key: Optional[int]) -> Tensor:
    """``src`` in ``dtype``: stochastically rounded for bfloat16 with a key, else as ``Tensor.to``
    (round to nearest). Other low-precision types (float16) have no SR here."""
    if key is not None and dtype == torch.bfloat16 and src.dtype == torch.float32:
        return stochastic_round(src, key)
    return src.to(dtype)
