"""Sharded equivalence on 2 CPU ranks (gloo): β and the updated parameters equal a
single process stepping the same gradients, to float32 rounding.

One spawn runs every scenario (process start-up dominates): parameter subsets
(ZeroRedundancyOptimizer style) and flat shards with zero padding (DeepSpeed ZeRO
style), both with a ProcessGroup reducer; FSDP2 ``fully_shard`` DTensor params
(automatic reducer); DDP-like full replicas with reducer=None. Global and per-layer,
on the default, the fused (C++ on CPU) and the Triton kernels (interpreted; flat shards
with a layer map take the for-loop lines on every impl).
"""

import os

import pytest
import torch
import torch.multiprocessing as mp

from amllm.optim import AMSGD, AMAdamW
from tests.dist_cases import free_port

SHAPES = [(6, 8), (6,), (3, 6), (3,)]  # the tiny MLP below: Linear(8,6), Linear(6,3)
STEPS = 8
TOL = dict(rtol=2e-5, atol=2e-6)


def _problem():
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    mean = [torch.randn(s, generator=g) for s in SHAPES]
    # a fixed mean + noise, reversed every third step, so β moves inside (0, β_max)
    grads = [[(1.0 if t % 3 else -0.5) * m + torch.randn(m.shape, generator=g) for m in mean] for t in range(STEPS)]
    return init, grads


def _reference(cls, per_layer, kw):
    """Single process: β per step and final params."""
    init, grads = _problem()
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls(params, per_layer=per_layer, **kw)
    betas = []
    for t in range(STEPS):
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        opt.step()
        betas.append(opt.last_beta.clone())
    return betas, [p.detach() for p in params]


KW = {AMAdamW: dict(lr=1e-2, weight_decay=0.1), AMSGD: dict(lr=1e-2, weight_decay=0.1)}


def _opt(cls, params, impl=None, **kw):
    """The optimizer, its kernel path forced by name when ``impl`` is given (as the tests do)."""
    opt = cls(params, **kw)
    if impl is not None:
        opt.impl = impl
    return opt


def _param_subsets(rank, cls, per_layer, kw):
    import torch.distributed as dist

    init, grads = _problem()
    mine = [i for i in range(len(SHAPES)) if i % 2 == rank]
    params = {i: torch.nn.Parameter(init[i].clone()) for i in mine}
    opt = _opt(cls, list(params.values()), per_layer=per_layer, reducer=dist.group.WORLD, **kw)
    if per_layer:  # global layer numbering, the same on every rank
        opt.set_layer_map({params[i]: i for i in mine}, n_layers=len(SHAPES))
    betas = []
    for t in range(STEPS):
        for i in mine:
            params[i].grad = grads[t][i].clone()
        opt.step()
        betas.append(opt.last_beta.clone())
    return betas, {i: p.detach() for i, p in params.items()}


def _flat_shard(rank, world, cls, per_layer, kw):
    import torch.distributed as dist

    init, grads = _problem()
    sizes = [x.numel() for x in init]
    total = sum(sizes)
    shard = -(-total // world)  # padded to world * shard with zeros at the end

    def my_slice(tensors):
        flat = torch.cat([x.reshape(-1) for x in tensors] + [torch.zeros(shard * world - total)])
        return flat[rank * shard:(rank + 1) * shard].clone()

    p = torch.nn.Parameter(my_slice(init))
    opt = _opt(cls, [p], per_layer=per_layer, reducer=dist.group.WORLD, **kw)
    if per_layer:
        lo, spans, start = rank * shard, [], 0
        for layer, n in enumerate(sizes):
            a, b = max(start, lo), min(start + n, lo + shard)
            if a < b:
                spans.append((layer, a - lo, b - lo))
            start += n
        opt.set_layer_map({p: spans}, n_layers=len(sizes))
    betas = []
    for t in range(STEPS):
        p.grad = my_slice(grads[t])
        opt.step()
        betas.append(opt.last_beta.clone())
    return betas, p.detach(), shard, total


def _fsdp2(cls, per_layer, kw):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    init, grads = _problem()
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for p, x in zip(model.parameters(), init):
            p.copy_(x)
    mesh = init_device_mesh("cpu", (2,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    opt = _opt(cls, params, per_layer=per_layer, **kw)  # reducer: automatic (DTensor)
    betas = []
    for t in range(STEPS):
        for p, g in zip(params, grads[t]):
            p.grad = distribute_tensor(g.clone(), p.device_mesh, p.placements)
        opt.step()
        betas.append(opt.last_beta.clone())
    return betas, [p.full_tensor().detach() for p in params]


def _ddp_like(cls, per_layer, kw):
    init, grads = _problem()
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = _opt(cls, params, per_layer=per_layer, reducer=None, **kw)
    betas = []
    for t in range(STEPS):
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()  # every rank holds the full averaged gradient
        opt.step()
        betas.append(opt.last_beta.clone())
    return betas, [p.detach() for p in params]


def _close_betas(got, ref, what):
    for t, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: β at step {t}: {m}")


def _worker(rank, world, port):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for cls in (AMAdamW, AMSGD):
            for per_layer in (False, True):
                # the sharded runs on the default (foreach), the fused (C++) and the Triton
                # kernels; the single-process reference always on the default path
                for impl in (None, "fused", "triton"):
                    kw = dict(KW[cls], fused=True, impl=impl) if impl else KW[cls]
                    what = f"{cls.__name__} per_layer={per_layer} impl={impl}"
                    ref_betas, ref_params = _reference(cls, per_layer, KW[cls])
                    assert any(bool(((b > 0) & (b < 0.9)).any()) for b in ref_betas), "β never inside (0, β_max)"

                    betas, mine = _param_subsets(rank, cls, per_layer, kw)
                    _close_betas(betas, ref_betas, "param subsets " + what)
                    for i, p in mine.items():
                        torch.testing.assert_close(p, ref_params[i], **TOL)

                    betas, p, shard, total = _flat_shard(rank, world, cls, per_layer, kw)
                    _close_betas(betas, ref_betas, "flat shards " + what)
                    flat_ref = torch.cat([x.reshape(-1) for x in ref_params] + [torch.zeros(shard * world - total)])
                    torch.testing.assert_close(p, flat_ref[rank * shard:(rank + 1) * shard], **TOL)

                    betas, full = _fsdp2(cls, per_layer, kw)
                    _close_betas(betas, ref_betas, "FSDP2 " + what)
                    for a, b in zip(full, ref_params):
                        torch.testing.assert_close(a, b, **TOL)

                    betas, full = _ddp_like(cls, per_layer, kw)
                    _close_betas(betas, ref_betas, "DDP-like reducer=None " + what)
                    for a, b in zip(full, ref_params):
                        torch.testing.assert_close(a, b, **TOL)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_equivalence_two_ranks():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
