"""Resolving the optimizer's ``reducer`` argument: how partial sums become global sums.

The β of AM-AdamW / AM-SGD is a ratio of sums over every element that shares it. When
each rank holds only part of those elements, the packed partial sums (one small tensor,
``[n_layers, K + 1]``) must be summed across the ranks that hold the other parts — with
ONE all-reduce per step. Which ranks, depends on the parallelism:

============================  =========================================================
``reducer``                   meaning
============================  =========================================================
``None``, plain tensors       single process or DDP: every rank holds the full, already
                              averaged gradient, so nothing is reduced (reducing would
                              count every element world-size times).
``None``, DTensor params      FSDP2 (``fully_shard``): automatic. Sums are taken over the
                              local shards (``to_local()``), then all-reduced over the
                              mesh dimensions on which the parameters are *sharded*;
                              replicated dimensions (HSDP) are not summed, so nothing is
                              counted twice. Plain tensors mixed in count once (their
                              sums are divided by the reduce-group size).
a ``ProcessGroup``            flat shards or parameter subsets (DeepSpeed ZeRO-1/2,
                              ``ZeroRedundancyOptimizer``): ``all_reduce(SUM)`` over it.
a callable                    ``reduce(packed) -> summed``, used as is (tests, custom
                              backends). Must be called by every rank every step.
============================  =========================================================

``torch.distributed`` is imported inside the functions only, never at module import.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

ReduceFn = Callable[[Tensor], Tensor]


@functools.cache
def _dtensor_cls():
    """The DTensor class, or None when torch.distributed is unavailable (looked up once:
    it is asked for every tensor on every step)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The rank-local tensor: ``t.to_local()`` for a DTensor (shares storage), else ``t``.

    Work on local tensors explicitly: reductions on a DTensor would go through DTensor
    dispatch, and ``.sum()`` of a ``Partial`` DTensor silently yields local values.
    """
    if t is not None and is_dtensor(t):
        return t.to_local()
    return t


def group_serves(group, device: torch.device) -> bool:
    """Whether ``group`` (None: the default group) has a backend for tensors on ``device``.

    NCCL serves CUDA tensors only: under ZeRO optimizer offload the AM statistics are CPU tensors
    and DeepSpeed's data-parallel group cannot reduce them (``init_process_group("cuda:gloo")``
    emulates that on a CPU machine)."""
    import torch.distributed as dist

    pg = group if group is not None else dist.group.WORLD
    try:
        pg._get_backend(torch.device(device))
    except RuntimeError:
        return False
    return True


def process_group_reducer(group) -> ReduceFn:
    """``all_reduce(SUM)`` of the packed sums over ``group`` (in place, returned).

    The first reduction from each device type checks that the group serves it and otherwise
    stops with what to do, instead of c10d's "No backend type associated with device type"."""
    import torch.distributed as dist

    served: set[str] = set()

    def reduce(packed: Tensor) -> Tensor:
        if packed.device.type not in served:
            if not group_serves(group, packed.device):
                backend = dist.get_backend(group)
                raise RuntimeError(
                    f"the AM optimizer's statistics are {packed.device.type} tensors but its reducer, a "
                    f"{backend!r} process group, has no {packed.device.type} backend (NCCL serves CUDA only); "
                    f"pass reducer=dist.new_group(ranks, backend='gloo') for CPU parameters (ZeRO offload: "
                    f"amllm.parallel.deepspeed_backend.build_engine does this)")
            served.add(packed.device.type)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        return packed

    return reduce


def _mesh_reducer(params: list[Tensor]) -> tuple[Optional[ReduceFn], float]:
    """Reducer for DTensor params: sum over the mesh dims with a ``Shard`` placement."""
    from torch.distributed.tensor import Shard

    keys = set()
    for p in params:
        if is_dtensor(p):
            dims = tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))
            keys.add((p.device_mesh, dims))
    if len(keys) != 1:
        raise ValueError(
            "DTensor parameters on different meshes or with different sharded mesh dims: "
            "pass reducer= explicitly (a ProcessGroup or a callable)"
        )
    ((mesh, dims),) = keys
    if not dims:  # replicated everywhere: every rank already holds everything
        return None, 1.0
    groups = [mesh.get_group(mesh_dim=d) for d in dims]
    reducers = [process_group_reducer(g) for g in groups]
    size = 1
    for d in dims:
        size *= mesh.size(d)

    def reduce(packed: Tensor) -> Tensor:
        # usually one shard dim (FSDP2, HSDP): one collective. 2-D sharding: one per dim.
        for r in reducers:
            packed = r(packed)
        return packed

    return reduce, 1.0 / size


def resolve_reducer(reducer, params: Iterable[Tensor]) -> tuple[Optional[ReduceFn], float]:
    """Turn the user's ``reducer`` argument into ``(reduce_fn or None, plain_weight)``.

    ``plain_weight`` multiplies the partial sums of non-DTensor parameters (1.0 unless an
    automatic mesh reduction would otherwise count a replicated plain tensor R times).
    """
    params = list(params)
    if reducer is None:
        if any(is_dtensor(p) for p in params):
            return _mesh_reducer(params)
        return None, 1.0
    if torch.distributed.is_available():
        import torch.distributed as dist

        if isinstance(reducer, dist.ProcessGroup):
            return process_group_reducer(reducer), 1.0
    if callable(reducer):
        return reducer, 1.0
    raise TypeError(
        f"reducer must be None, a torch.distributed.ProcessGroup or a callable, got {type(reducer).__name__}"
    )
