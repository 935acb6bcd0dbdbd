"""Small device tables the step reuses (layer ids, weights, pointers), built on the host once.

A table is keyed by everything it is computed from (tensor addresses, sizes, layers,
weights) and rebuilt only when that changes: in steady state a step finds its tables here
and issues no host-to-device copy at all. When one is needed (first step, gradients
reallocated at new addresses), the host data goes through pinned memory with
``non_blocking=True``: a pageable or blocking copy would make the host wait for the GPU
queue every time (``torch.cuda.set_sync_debug_mode("error")`` catches that).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_MAX = 64  # a few entries per bucket and step shape; old ones go when grads move around


def upload(host: Tensor, device: torch.device) -> Tensor:
    """``host`` (a CPU tensor) on ``device`` without a synchronising copy.

    The staging copy comes from torch's pinned (caching host) allocator, which records the
    asynchronous copy's event and does not reuse the block before the copy has read it.
    """
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def cached(key: tuple, build: Callable[[], object]):
    """``build()`` once per ``key`` (LRU over ``_MAX`` entries)."""
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    value = build()
    _CACHE[key] = value
    if len(_CACHE) > _MAX:
        _CACHE.popitem(last=False)
    return value


def layer_matrix(layers: list[int], weights: list[float], numels: list[int], n_layers: int,
                 device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(M, counts)``: ``M[l, k]`` = weight of tensor k if it is in layer l, else 0 (``[L, n]``),
    and the element count per layer (``[L, 1]``). ``M @ rows`` routes per-tensor sums to
    layers in one matmul: deterministic (no atomics, unlike ``index_add_`` on CUDA) and
    no per-tensor loop."""
    def build():
        m = torch.zeros(n_layers, len(layers), dtype=dtype)
        counts = torch.zeros(n_layers, 1, dtype=dtype)
        for k, (layer, w, n) in enumerate(zip(layers, weights, numels)):
            m[layer, k] = w
            counts[layer, 0] += n
        return upload(m, device), upload(counts, device), m, counts  # host copies kept alive

    key = ("layer_matrix", tuple(layers), tuple(weights), tuple(numels), n_layers, str(device), dtype)
    return cached(key, build)[:2]
