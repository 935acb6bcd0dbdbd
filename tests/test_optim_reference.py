"""Lockstep: AMAdamW / AMSGD (every implementation, float64 and float32) vs the float64
oracle in tests/reference_am.py, over 24 steps of a problem with two param groups
(different lr, weight decay, β2, eps), a warmup+cosine lr with an lr=0 step, a parameter
whose grad is None on some steps, a zero-size parameter, all policies and layer modes.

The Triton kernels (``impl="triton"``) run under Triton's interpreter on CPU tensors, or on
a GPU with ``AMLLM_TEST_DEVICE=cuda`` (tools/gpu_check.sh): then only the triton cases
move there; the oracle stays on the CPU in float64."""

import math

import pytest
import torch

from amllm.optim import AMSGD, AMAdamW, _compiled, _cpu_ext, _triton
from reference_am import RefAMAdamW, RefAMSGD


SHAPES = [(6, 5), (7,), (0,), (4, 3), (3,)]
GROUP_OF = [0, 0, 0, 1, 1]
STEPS = 24


def lr_at(t, base=0.05):
    """Linear warmup from 0 (so step 0 has lr = 0), then cosine."""
    if t < 4:
        return base * t / 4
    return base * 0.5 * (1 + math.cos(math.pi * (t - 4) / STEPS))


def make_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    out = []
    for t in range(STEPS):
        # a fixed mean + noise, reversed every third step, so β moves inside (0, β_max)
        sign = -0.5 if t % 3 == 0 else 1.0
        step = [sign * m + torch.randn(m.shape, generator=g, dtype=torch.float64) for m in mean]
        if t % 5 == 3:
            step[1] = None  # skipped on this step
        out.append(step)
    return out


def layer_setup(mode):
    """(per_layer, layer_per_group of group 1, layer_of, n_layers)."""
    if mode == "global":
        return False, False, [0] * 5, 1
    if mode == "tensor":
        return True, False, [0, 1, 2, 3, 4], 5
    return True, True, [0, 1, 2, 3, 3], 4  # group 1 shares one β


IMPL_KW = {"auto": {}, "foreach": {"foreach": True}, "forloop": {"foreach": False}, "fused": {"fused": True},
           "compiled": {"fused": True}, "triton": {"fused": True}}


def build(cls, dtype, mode, policy, impl, hp0, hp1, device="cpu", **kw):
    torch.manual_seed(1)
    init = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    params = [torch.nn.Parameter(x.to(device, dtype)) for x in init]
    per_layer, lpg, layer_of, n_layers = layer_setup(mode)
    groups = [
        {"params": [params[i] for i in range(5) if GROUP_OF[i] == 0], **hp0},
        {"params": [params[i] for i in range(5) if GROUP_OF[i] == 1], "layer_per_group": lpg, **hp1},
    ]
    opt = cls(groups, lr=0.0, per_layer=per_layer, beta_policy=policy, **IMPL_KW[impl], **kw)
    if impl in ("compiled", "triton"):
        opt.impl = impl  # force the Inductor kernels / the Triton kernels
    return opt, params, init, layer_of, n_layers


POLICY_KW = {"am": {}, "clip": {"beta_min": 0.3}, "restart": {"restart_threshold": 0.6, "restart_low": 0.2}}
REF_POLICY = {"am": {}, "clip": {"beta_min": 0.3}, "restart": {"theta": 0.6, "low": 0.2}}
# fused: on CPU the C++ kernels (csrc/am_cpu.cpp); AM-AdamW also has the torch.compile'd
# two-pass kernels, compiled once per dtype; triton: the multi-tensor kernels (interpreted).
SGD_CASES = [(m, pol, impl) for m in ("global", "tensor", "group") for pol in ("am", "clip", "restart")
             for impl in ("foreach", "forloop", "fused", "triton")]
ADAMW_CASES = [(m, pol, impl) for m in ("global", "tensor", "group") for pol in ("am", "clip", "restart")
               for impl in ("foreach", "forloop", "fused", "compiled", "triton")]


def run_lockstep(cls, ref_cls, dtype, mode, policy, impl, hp0, hp1, ref_hp, tol, state_of, lam=0.1,
                 device="cpu"):
    """Steps both in lockstep; ``state_of(ref)`` -> [(state key, per-param ref tensors)]."""
    opt, params, init, layer_of, n_layers = build(
        cls, dtype, mode, policy, impl, hp0, hp1, device=device, lam=lam, **POLICY_KW[policy])
    if impl == "fused":  # the C++ kernels really run (no silent fallback)
        assert opt._resolved_impl() == "fused" and _cpu_ext.available(torch.device("cpu"), dtype)
    if impl == "compiled":
        assert _compiled.available(torch.device("cpu"), dtype)
    if impl == "triton":
        assert _triton.available(torch.device(device), dtype)
        launches = _triton.launches
    ref = ref_cls(init, GROUP_OF, [dict(ref_hp[0]), dict(ref_hp[1])], layer_of, n_layers,
                  beta_max=0.9, policy=policy, **REF_POLICY[policy])
    betas_seen = []
    for t, grads in enumerate(make_grads()):
        for gi, lr_scale in ((0, 1.0), (1, 0.5)):
            opt.param_groups[gi]["lr"] = lr_scale * lr_at(t)
            ref.groups[gi]["lr"] = lr_scale * lr_at(t)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(device, dtype)
        opt.step()
        rb = ref.step(grads)
        betas_seen += rb
        rtol, atol = tol
        beta = opt.beta_state.last_beta.cpu()
        torch.testing.assert_close(beta.double(), torch.tensor(ref.last_beta, dtype=torch.float64),
                                   rtol=rtol, atol=atol, msg=lambda m: f"β at step {t}: {m}")
        torch.testing.assert_close(opt.beta_state.pi.cpu().double(), torch.tensor(ref.pi, dtype=torch.float64),
                                   rtol=rtol, atol=atol)
        assert int(opt.fallback_count) == ref.fallback
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().cpu().double(), ref.x[i], rtol=rtol, atol=atol,
                                       msg=lambda m: f"param {i} at step {t}: {m}")
            st = opt.state[p]
            for key, ref_list in state_of(ref):
                if ref_list[i] is None:
                    assert key not in st
                else:
                    torch.testing.assert_close(st[key].cpu().double(), ref_list[i], rtol=rtol, atol=atol)
    if impl == "triton":  # the kernels really ran: 3 launches per bucket (2 groups) and step at most
        assert 0 < _triton.launches - launches <= 6 * STEPS
    return betas_seen


ADAMW_HP = ({"lr": 0.0, "weight_decay": 0.1}, {"lr": 0.0, "weight_decay": 0.0, "betas": (0.9, 0.99), "eps": 1e-6})
ADAMW_REF = ({"lr": 0.0, "weight_decay": 0.1, "eps": 1e-8, "beta2": 0.999, "lam": 0.1},
             {"lr": 0.0, "weight_decay": 0.0, "eps": 1e-6, "beta2": 0.99, "lam": 0.1})
SGD_HP = ({"lr": 0.0, "weight_decay": 0.1}, {"lr": 0.0, "weight_decay": 0.0})
SGD_REF = ({"lr": 0.0, "weight_decay": 0.1, "lam": 0.1}, {"lr": 0.0, "weight_decay": 0.0, "lam": 0.1})


def _gpu_tol(tol, impl, device):
    """Compiled Triton passes Python floats as float32 scalars (the interpreter keeps them
    float64): for float64 params on a GPU, lr, ε, λ, β2 are rounded to float32 (relative
    6e-8), so the float64 tolerance there is that of the scalars."""
    if impl == "triton" and torch.device(device).type != "cpu" and tol[0] < 1e-6:
        return (1e-6, 1e-8)
    return tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, (1e-10, 1e-12)), (torch.float32, (2e-5, 2e-6))])
@pytest.mark.parametrize("mode,policy,impl", ADAMW_CASES)
def test_am_adamw_matches_reference(dtype, tol, mode, policy, impl, request):
    device = request.getfixturevalue("triton_device") if impl == "triton" else "cpu"
    tol = _gpu_tol(tol, impl, device)
    betas = run_lockstep(AMAdamW, RefAMAdamW, dtype, mode, policy, impl, ADAMW_HP[0], ADAMW_HP[1], ADAMW_REF,
                         tol, lambda ref: [("exp_avg", ref.d), ("exp_avg_sq", ref.v)], device=device)
    if policy == "am":  # the ratio branch was exercised, not only clips and fallbacks
        assert any(0.0 < b < 0.9 for b in betas)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, (1e-10, 1e-12)), (torch.float32, (2e-5, 2e-6))])
@pytest.mark.parametrize("mode,policy,impl", SGD_CASES)
def test_am_sgd_matches_reference(dtype, tol, mode, policy, impl, request):
    device = request.getfixturevalue("triton_device") if impl == "triton" else "cpu"
    tol = _gpu_tol(tol, impl, device)
    betas = run_lockstep(AMSGD, RefAMSGD, dtype, mode, policy, impl, SGD_HP[0], SGD_HP[1], SGD_REF, tol,
                         lambda ref: [("momentum_buffer", ref.d)], device=device)
    if policy == "am":
        assert any(0.0 < b < 0.9 for b in betas)


# ------------------------------------------------------------------ ZeRO-like views of one flat buffer
@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("impl", ["fused", "triton"])
@pytest.mark.parametrize("aligned", [False, True, "mixed"])
def test_views_of_one_flat_buffer_match_reference(cls, per_layer, impl, aligned, request):
    """Params and grads are views of two flat float32 buffers (as ZeRO's per-layer views of
    its flat partitions): at odd offsets (4-byte but not 16-byte aligned), or at offsets and
    sizes that are multiples of 16 elements (the Triton kernels' 128-bit variant), or both in
    one bucket ("mixed": alignment is decided per tensor): the kernels address them through
    their tables and match the oracle."""
    device = request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")
    if aligned == "mixed":
        shapes = [(4, 8), (5, 7), (16,), (3,), (2, 16), (11,)]
        flags = [True, False, True, False, True, False]
        offsets, cursor = [], 0
        for n, flag in zip([math.prod(s) for s in shapes], flags):  # a gap before every view
            cursor = -(-(cursor + 16) // 16) * 16 if flag else cursor + (1 if cursor % 2 == 0 else 2)  # odd
            offsets.append(cursor)
            cursor += n
    else:
        shapes = [(4, 8), (16,), (2, 16), (48,)] if aligned else [(5, 7), (3,), (1,), (4, 9), (11,)]
        flags = [aligned] * len(shapes)
        gap = 16 if aligned else 1
        offsets = [gap * 3 + sum(math.prod(s) for s in shapes[:i]) + gap * i for i in range(len(shapes))]
    sizes = [math.prod(s) for s in shapes]
    total = offsets[-1] + sizes[-1] + 2
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    flat = torch.zeros(total, device=device)
    gflat = torch.zeros(total, device=device)
    params = []
    for x, o, n in zip(init, offsets, sizes):
        flat[o:o + n] = x.reshape(-1).to(device, torch.float32)
        params.append(torch.nn.Parameter(flat[o:o + n].view(x.shape)))
    assert [p.data_ptr() % 16 == 0 for p in params] == flags
    kw = dict(lr=0.02, weight_decay=0.1) if cls is AMAdamW else dict(lr=0.05, weight_decay=0.1)
    opt = cls(params, per_layer=per_layer, fused=True, lam=0.1, **kw)
    opt.impl = impl
    n_layers = len(shapes) if per_layer else 1
    layer_of = list(range(len(shapes))) if per_layer else [0] * len(shapes)
    if cls is AMAdamW:
        ref = RefAMAdamW(init, [0] * len(shapes), [dict(kw, eps=1e-8, beta2=0.999, lam=0.1)], layer_of, n_layers,
                         beta_max=0.9)
    else:
        ref = RefAMSGD(init, [0] * len(shapes), [dict(kw, lam=0.1)], layer_of, n_layers, beta_max=0.9)
    mean = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    for t in range(8):
        grads = [(1.0 if t % 3 else -0.5) * m + torch.randn(m.shape, generator=gen, dtype=torch.float64)
                 for m in mean]
        for p, g, o, n in zip(params, grads, offsets, sizes):
            gflat[o:o + n] = g.reshape(-1).to(device, torch.float32)
            p.grad = gflat[o:o + n].view(p.shape)
        opt.step()
        ref.step(grads)
        torch.testing.assert_close(opt.beta_state.last_beta.cpu().double(), torch.tensor(ref.last_beta,
                                   dtype=torch.float64), rtol=2e-5, atol=2e-6)
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().cpu().double(), ref.x[i], rtol=2e-5, atol=2e-6)
    if impl == "triton":  # the step's cached tables: the 128-bit body ran for exactly the aligned tensors
        st = [opt.state[p] for p in params]
        lists = [params, [p.grad for p in params]]
        lists += ([[x["exp_avg"] for x in st], [x["exp_avg_sq"] for x in st], [x["step"] for x in st]]
                  if cls is AMAdamW else [[x["momentum_buffer"] for x in st]])
        meta = _triton.metadata(lists, layer_of, [1.0] * len(params), n_layers, device)
        assert meta.align.tolist() == [int(f) for f in flags]
        assert meta.align_mode == {False: 0, True: 1, "mixed": 2}[aligned]
    gaps = torch.ones(total, dtype=torch.bool)
    for o, n in zip(offsets, sizes):
        gaps[o:o + n] = False
    assert torch.all(flat.cpu()[gaps] == 0)  # nothing written outside the views
