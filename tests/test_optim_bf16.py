"""bf16 parameters without a float32 master copy (train.precision=bf16_pure): float32 optimizer state
and stochastic rounding (SR) of the parameter write-back. See "Low-precision parameters" in
docs/optimizer.md.

References are independent of the code under test: bf16 neighbours and spacings from float64
arithmetic, the hash from Python integers, the updates from the float64 oracle (tests/reference_am.py).
Statistical bounds are 5-6 standard deviations of the quantity tested (derived in each test), so a
correct implementation fails them with probability < 1e-6 while the seeds are fixed anyway.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from amllm.config import ConfigError, OptimConfig, load_config
from amllm.debug import HostReads
from amllm.optim import AMSGD, AMAdamW, _triton, rounding
from amllm.optim.functional import AdamWGroup, _adamw_buckets
from amllm.optim_factory import build_optimizer
from reference_am import RefAMAdamW, RefAMSGD

BF16_MANTISSA = 7  # explicit mantissa bits of bfloat16


# impl="triton" on CPU tensors runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
# unless AMLLM_TEST_DEVICE names a GPU; then only the tests taking `triton_device` run the kernels there).


def spacing(x: float) -> float:
    """The bf16 spacing of the binade holding |x| (float64 arithmetic, not torch's rounding)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - BF16_MANTISSA)


def neighbours(x: float) -> tuple[float, float]:
    """The bf16 values just below and just above |x| (equal if x is a bf16 value), sign applied."""
    s = spacing(x)
    lo = math.floor(abs(x) / s) * s
    hi = math.ceil(abs(x) / s) * s
    return (math.copysign(lo, x), math.copysign(hi, x))


# ----------------------------------------------------------------------------- the rounding itself

def _fmix32_reference(h: int) -> int:
    """murmur3's fmix32 on Python integers (plain multiplication, mod 2^32)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


def test_random_bits_are_the_documented_hash():
    """The int64 tensor arithmetic (products split below 2^63) equals the hash on Python integers."""
    key = rounding.tensor_key(7, 123456789, 3)
    bits = rounding.random_bits(1000, key, "cpu", start=2**31 - 500).tolist()
    want = [_fmix32_reference((i * 0x9E3779B9 + key) % 2**32) >> 16 for i in range(2**31 - 500, 2**31 + 500)]
    assert bits == want


def test_random_bits_are_uniform():
    """2^16 draws of 16 bits: every one of 16 bins within 6 sigma of n/16, mean within 6 sigma of 2^15."""
    n = 1 << 16
    r = rounding.random_bits(n, rounding.tensor_key(0, 0, 0), "cpu").double()
    assert int(r.min()) >= 0 and int(r.max()) < 2**16
    sd_mean = (2**16 / math.sqrt(12)) / math.sqrt(n)
    assert abs(float(r.mean()) - (2**16 - 1) / 2) < 6 * sd_mean
    counts = torch.bincount((r // 4096).long(), minlength=16).double()
    sd_bin = math.sqrt(n * (1 / 16) * (15 / 16))
    assert float((counts - n / 16).abs().max()) < 6 * sd_bin


@pytest.mark.parametrize("x", [1.0 - 1e-3, 1.0 + 1e-3, -0.7531, 3.14159e-5, -12345.678, 1e30, 2.0**-126 * 1.3])
def test_sr_is_unbiased_and_lands_on_a_neighbour(x):
    """N draws of SR(x): each is one of x's two bf16 neighbours; the rate of rounding up is the
    remainder's fraction f of the spacing, within 6 binomial sigmas, so the mean is x within
    6 · s · sqrt(f(1-f)/N)."""
    n = 1 << 16
    src = torch.full((n,), x, dtype=torch.float32)
    x32 = float(src[0])  # the float32 value actually rounded
    lo, hi = neighbours(x32)
    out = rounding.stochastic_round(src, rounding.tensor_key(1, 2, 3)).double()
    assert out.dtype == torch.float64 and set(out.unique().tolist()) <= {lo, hi}
    f = (x32 - lo) / (hi - lo)
    up = float((out == hi).double().mean())
    assert abs(up - f) <= 6 * math.sqrt(f * (1 - f) / n) + 1e-12
    assert abs(float(out.mean()) - x32) <= 6 * abs(hi - lo) * math.sqrt(f * (1 - f) / n) + 1e-12 * abs(x32)


def test_sr_keeps_bf16_values_and_special_values():
    exact = torch.tensor([1.0, -2.0, 0.0, -0.0, 2.0**-133, 3.3895e38, float("inf"), float("-inf")]).bfloat16()
    out = rounding.stochastic_round(exact.float().repeat(1000), 5)
    assert torch.equal(out.view(1000, -1), exact.expand(1000, -1))
    assert torch.equal(out.view(1000, -1).view(torch.int16), exact.expand(1000, -1).view(torch.int16))  # -0.0 kept
    assert torch.isnan(rounding.stochastic_round(torch.full((100,), float("nan")), 5).float()).all()


def test_sr_is_deterministic_and_depends_on_seed_step_and_tensor():
    src = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    key = rounding.tensor_key(0, 10, 2)
    a = rounding.stochastic_round(src, key)
    assert torch.equal(a, rounding.stochastic_round(src.clone(), rounding.tensor_key(0, 10, 2)))
    for other in (rounding.tensor_key(1, 10, 2), rounding.tensor_key(0, 11, 2), rounding.tensor_key(0, 10, 3)):
        b = rounding.stochastic_round(src, other)
        # each element rounds the other way with probability 2f(1-f) <= 1/2: many differ, none by more than a spacing
        assert 0.05 < float((a != b).double().mean()) < 0.95
    assert len({rounding.tensor_key(s, t, i) for s in range(4) for t in range(50) for i in range(50)}) == 10000


def test_large_tensors_are_rounded_in_slices_like_one_piece(monkeypatch):
    src = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    whole = rounding.stochastic_round(src, 99)
    monkeypatch.setattr(rounding, "_CHUNK", 999)
    assert torch.equal(rounding.stochastic_round(src, 99), whole)


# ----------------------------------------------------------------------------- the optimizers

def _bf16_ones(n=4096):
    return torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
@pytest.mark.parametrize("impl", ["forloop", "foreach", "triton"])
def test_weight_at_one_moves_like_the_float64_reference(cls, impl):
    """An RMSNorm-like weight at 1.0 under 100 updates of about -1e-3 (lr 1e-3, gradient +1): the
    float64 oracle ends at x_ref ≈ 0.9. With SR the bf16 run's mean over n elements is x_ref within
    6 · sqrt(T) · s / 2 / sqrt(n) (T independent rounding errors of |e| < s = 2^-8 below 1, each of
    variance < s²/4; with no weight decay x does not feed back into the update). Round to nearest (the
    paper's harness) leaves every element at exactly 1.0: the update is below half the spacing."""
    T, n, lr = 100, 4096, 1e-3
    kw = dict(lr=lr, impl=impl, weight_decay=0.0)
    if cls is AMSGD:
        ref = RefAMSGD([torch.ones(1)], [0], [dict(lr=lr, weight_decay=0.0, lam=0.1)], [0], 1, beta_max=0.9)
    else:
        ref = RefAMAdamW([torch.ones(1)], [0], [dict(lr=lr, weight_decay=0.0, eps=1e-8, beta2=0.999, lam=0.1)],
                         [0], 1, beta_max=0.9)
        kw["betas"] = (0.9, 0.999)
    w, paper = _bf16_ones(n), _bf16_ones(n)
    opt = cls([w], **kw)
    opt_paper = cls([paper], **kw, state_dtype="param", stochastic_rounding=False)
    for _ in range(T):
        for p, o in ((w, opt), (paper, opt_paper)):
            p.grad = torch.ones_like(p)
            o.step()
        ref.step([torch.ones(1, dtype=torch.float64)])
    x_ref = float(ref.x[0])
    assert 0.85 < x_ref < 0.95
    bound = 6 * math.sqrt(T) * 2.0**-8 / 2 / math.sqrt(n)
    mean = float(w.detach().double().mean())
    assert abs(mean - x_ref) < bound, (mean, x_ref, bound)
    assert torch.equal(paper, torch.ones_like(paper))  # what bf16_pure did before: no movement at all


@pytest.mark.parametrize("impl", ["forloop", "foreach", "triton"])
def test_v_decays_with_fp32_state_and_not_with_bf16_state(impl):
    """v at 1.0, zero gradients: v_k = 0.999^k (float64), to float32 accuracy with state_dtype=fp32.
    In bf16 (the paper's harness) 0.999 · 1.0 rounds back to 1.0: v never decays."""
    runs = {}
    for state_dtype in ("fp32", "param"):
        w = _bf16_ones(64)
        opt = AMAdamW([w], lr=1e-3, betas=(0.9, 0.999), impl=impl, state_dtype=state_dtype)
        w.grad = torch.ones_like(w)
        opt.step()
        opt.state[w]["exp_avg_sq"].fill_(1.0)
        for _ in range(50):
            w.grad = torch.zeros_like(w)
            opt.step()
        runs[state_dtype] = opt.state[w]["exp_avg_sq"]
    assert runs["fp32"].dtype == torch.float32 and runs["param"].dtype == torch.bfloat16
    torch.testing.assert_close(runs["fp32"].double(), torch.full((64,), 0.999**50, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert torch.equal(runs["param"].float(), torch.ones(64))


def _problem(seed=0, shapes=((64, 48), (48,), (3, 17))):
    g = torch.Generator().manual_seed(seed)
    x0 = [torch.randn(s, generator=g, dtype=torch.float64).bfloat16().double() for s in shapes]  # bf16 values
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(12)]
    return x0, grads


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_bf16_update_against_the_float64_reference(cls):
    """12 steps from bf16 values with float64 gradients rounded to bf16. Without weight decay x does not
    feed back into the update (d, v and the sums are float32, the gradients given), so the bf16 run is
    the oracle's trajectory plus the rounding errors e_t, |e_t| < s (the spacing at the element): per
    element |x - x_ref| < T · s, and the mean error over N elements, a sum of independent zero-mean
    errors, within 6 · sqrt(T / N) · s_max / 2. The β's agree with the oracle's to float32 accuracy."""
    T = 12
    x0, grads = _problem()
    params = [torch.nn.Parameter(x.bfloat16()) for x in x0]
    kw = dict(lr=1e-2, lam=0.1, weight_decay=0.0, per_layer=True)
    groups = [dict(lr=1e-2, weight_decay=0.0, lam=0.1, eps=1e-8, beta2=0.99)]
    if cls is AMAdamW:
        opt = AMAdamW(params, betas=(0.9, 0.99), **kw)
        ref = RefAMAdamW(x0, [0] * 3, groups, [0, 1, 2], 3, beta_max=0.9)
    else:
        opt = AMSGD(params, momentum=0.9, **kw)
        ref = RefAMSGD(x0, [0] * 3, groups, [0, 1, 2], 3, beta_max=0.9)
    for t in range(T):
        gs = [g.bfloat16() for g in grads[t]]
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        betas = ref.step([g.double() for g in gs])
        torch.testing.assert_close(opt.last_beta.double(), torch.tensor(betas, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)
    errs, s_max = [], 0.0
    for p, x_start, xr in zip(params, x0, ref.x):
        # the spacing anywhere on the element's path (it moves by < 0.2 in 12 steps of lr 1e-2)
        s = 2.0 ** (torch.floor(torch.log2(torch.maximum(x_start.abs(), xr.abs()) + 0.2)) - BF16_MANTISSA)
        err = p.detach().double() - xr
        assert bool((err.abs() < T * s).all()), float((err.abs() / s).max())
        errs.append(err.reshape(-1))
        s_max = max(s_max, float(s.max()))
    err = torch.cat(errs)
    assert abs(float(err.mean())) < 6 * math.sqrt(T / err.numel()) * s_max / 2


def _train(cls, impl, state_dtype="fp32", sr=True, steps=6, dtype=torch.bfloat16, seed=0, **kw):
    x0, grads = _problem(seed)
    params = [torch.nn.Parameter(x.to(dtype)) for x in x0]
    opt = cls(params, lr=1e-2, impl=impl, state_dtype=state_dtype, stochastic_rounding=sr, weight_decay=1e-2,
              **kw)
    opt.found_inf = torch.zeros(())
    for t in range(steps):
        for p, g in zip(params, grads[t]):
            p.grad = g.to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_every_impl_gives_the_same_bf16_result(cls):
    """forloop (the spec's lines), foreach, the C++ and the Triton paths asked for (both serve bf16
    parameters with fp32 state on the "mixed" path) and fused: the same bits up to the float32
    rounding of the update before SR (so at most one bf16 spacing apart, almost everywhere equal)."""
    impls = ["forloop", "foreach", "cpp", "triton", "fused"] + (["compiled"] if cls is AMAdamW else [])
    runs = {impl: _train(cls, impl)[0] for impl in impls}
    for impl in impls[1:]:
        for a, b in zip(runs["forloop"], runs[impl]):
            diff = (a.double() - b.double()).abs()
            s = torch.tensor([spacing(v) if v != 0 else 2.0**-126 for v in a.double().reshape(-1).tolist()],
                             dtype=torch.float64).view_as(diff)
            assert bool((diff <= s).all()), impl
            assert float((diff == 0).double().mean()) > 0.99, impl


def test_bf16_with_fp32_state_takes_the_mixed_path_and_the_paper_harness_keeps_the_kernels():
    params = [torch.nn.Parameter(torch.randn(32).bfloat16()) for _ in range(2)]
    grads = [torch.randn(32).bfloat16() for _ in params]
    for state_dtype, sr, want in (("fp32", True, "mixed"), ("fp32", False, "mixed"), ("param", True, "mixed"),
                                  ("param", False, "triton")):
        opt = AMAdamW(params, impl="triton", state_dtype=state_dtype, stochastic_rounding=sr)
        sd = opt.state_dtype_for(params[0])
        g = AdamWGroup(params, grads, [torch.zeros(32, dtype=sd) for _ in params],
                       [torch.zeros(32, dtype=sd) for _ in params], [torch.zeros(())] * 2, [0, 0], lr=1e-3,
                       lr_ratio=1.0, weight_decay=0.0, eps=1e-8, beta2=0.99, lam=0.1,
                       sr_keys=[1, 2] if sr else None)
        assert [k[0] for k in _adamw_buckets(g, "triton")] == [want], (state_dtype, sr)
    # and the paper harness does run the Triton kernels (no silent change of its numerics)
    if not _triton.available(torch.device("cpu"), torch.bfloat16, warn=False):
        return  # AMLLM_TEST_DEVICE=cuda: triton imported compiled, no interpreter for CPU tensors
    launches = _triton.launches
    _train(AMAdamW, "triton", state_dtype="param", sr=False, steps=2)
    assert _triton.launches >= launches + 6


def test_fp16_parameters_keep_fp32_state_and_round_to_nearest():
    """SR is for bf16 (fp32's upper half); fp16 parameters get fp32 state and round-to-nearest."""
    a, opt = _train(AMAdamW, "foreach", dtype=torch.float16)
    b, _ = _train(AMAdamW, "foreach", dtype=torch.float16, sr=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items() if k != "step")


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_a_skipped_step_changes_nothing_on_the_mixed_path(cls):
    params, opt = _train(cls, "triton", steps=3)
    before = [p.detach().clone() for p in params]
    state = [v.clone() for st in opt.state.values() for v in st.values()]
    opt.found_inf = torch.ones(())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert bool(opt.last_skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(a, b) for a, b in zip(state, (v for st in opt.state.values() for v in st.values())))


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_quiet_bf16_steps_make_no_host_read(cls, triton_device):
    """The accelerator path (impl="fused" on CUDA; here the Triton impl forced, interpreted on CPU)
    with bf16 parameters, fp32 state, SR and both skip mechanisms: no host read after the first step."""
    x0, grads = _problem()
    params = [torch.nn.Parameter(x.bfloat16().to(triton_device)) for x in x0]
    opt = cls(params, lr=1e-2, impl="triton", skip_nonfinite=True)
    opt.found_inf = torch.zeros((), device=triton_device)
    for t in range(4):
        for p, g in zip(params, grads[t]):
            p.grad = g.bfloat16().to(triton_device)
        if t == 0:
            opt.step()  # first step: buffers created (AM-SGD reads the skip flag once here)
            continue
        with HostReads(strict=True):
            opt.step()
    assert all(p.dtype == torch.bfloat16 for p in params)


def test_bf16_pure_training_steps_make_no_host_read(train_overrides, tmp_path):
    """train.precision=bf16_pure with train.sync_debug=true (quiet steps refuse any host read), the
    Triton impl asked for (the accelerator's), non-finite steps skipped on the device."""
    import train

    over = train_overrides(tmp_path / "run", **{
        "train.max_steps": 8, "log.every": 4, "train.check_every": 4, "eval.every": 0, "checkpoint.every": 0,
        "train.sync_debug": "true", "train.precision": "bf16_pure", "optim.impl": "triton",
        "train.nonfinite": "skip"})
    assert train.main(over) == 0


# ----------------------------------------------------------------------------- checkpoints

def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_resume_is_bit_exact_with_fp32_state_and_sr(cls):
    """6 steps, save, 6 more, against 12 straight: the same bits. The state dict keeps d, v in float32
    (torch's load would cast them to the bf16 parameter dtype) and the SR counter."""
    x0, grads = _problem(1)

    def make():
        ps = [torch.nn.Parameter(x.bfloat16()) for x in x0]
        return ps, cls(ps, lr=1e-2, weight_decay=1e-2, sr_seed=5)

    def run(ps, opt, steps):
        for t in steps:
            for p, g in zip(ps, grads[t]):
                p.grad = g.bfloat16()
            opt.step()

    pa, a = make()
    run(pa, a, range(12))
    pb, b = make()
    run(pb, b, range(6))
    sd = _save_load(b.state_dict())
    assert int(sd["am_state"]["sr_step"]) == 6
    moments = [v for st in sd["state"].values() for k, v in st.items() if k != "step"]
    assert moments and all(v.dtype == torch.float32 for v in moments)
    pc, c = make()
    with torch.no_grad():
        for x, y in zip(pc, pb):
            x.copy_(y)
    c.load_state_dict(sd)
    assert all(v.dtype == torch.float32 for st in c.state.values() for k, v in st.items() if k != "step")
    run(pc, c, range(6, 12))
    assert all(torch.equal(x, y) for x, y in zip(pa, pc))


@pytest.mark.slow
def test_bf16_pure_fsdp2_resume_is_bit_exact(train_overrides, tmp_path):
    """FSDP2 (one rank through torchrun): DCP saves the fp32 moments as DTensors and am_state with the SR
    counter; a run stopped after step 4 and resumed ends with the straight run's weights and losses."""
    import subprocess

    from amllm.metrics import read_metrics
    from amllm.parallel.full_state import full_model_state
    from conftest import ROOT
    from dist_cases import cli_env, train_cli

    kw = {"parallel.backend": "fsdp2", "train.precision": "bf16_pure", "optim.name": "am_adamw"}
    runs = {}
    for name, stop in (("straight", None), ("split", "4")):
        run = tmp_path / name
        envs = [cli_env(AMLLM_TEST_STOP_AT_STEP=stop), cli_env()] if stop else [cli_env()]
        for env in envs:  # split: stopped after step 4 (torchrun reports the worker's exit 75 as 1), resumed
            p = subprocess.run(train_cli("torchrun", 1) + train_overrides(run, **kw), cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
            assert p.returncode == 0 or "AMLLM_TEST_STOP_AT_STEP" in env, p.stdout[-2000:] + p.stderr[-3000:]
            assert (run / "step-4").is_dir() or not stop, p.stderr[-3000:]
        runs[name] = run
    a, b = (read_metrics(runs[n], "train") for n in ("straight", "split"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 6
    pa, pb = full_model_state(runs["straight"] / "step-6"), full_model_state(runs["split"] / "step-6")
    assert all(pa[k].dtype == torch.bfloat16 and torch.equal(pa[k], pb[k]) for k in pa)


def test_a_bf16_state_dict_loads_into_fp32_state_exactly():
    """A checkpoint of the paper's harness (bf16 d, v) resumes with float32 state: upcast, values equal;
    and one without ``sr_step`` (older versions) starts the SR counter at 0."""
    params, old = _train(AMAdamW, "foreach", state_dtype="param", sr=False, steps=3)
    sd = _save_load(old.state_dict())
    del sd["am_state"]["sr_step"]
    new = AMAdamW(params, lr=1e-2)
    new.load_state_dict(sd)
    for p in params:
        for k in ("exp_avg", "exp_avg_sq"):
            assert new.state[p][k].dtype == torch.float32
            assert torch.equal(new.state[p][k], old.state[p][k].float())
    assert new._sr_step == 0


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("over, msg", [
    (["optim.state_dtype=bf16"], r"optim.state_dtype='bf16' is not valid; choose one of fp32, param"),
    (["optim.stochastic_rounding=maybe"], r"optim.stochastic_rounding='maybe' is not valid; choose one of auto, true"),
    (["optim.name=adamw", "optim.stochastic_rounding=true"],
     r"optim.stochastic_rounding=true applies to am_adamw/am_sgd only"),
])
def test_config_errors_are_one_line(over, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(None, over)
    assert "\n" not in str(e.value)


def test_config_values_and_what_the_optimizer_gets():
    assert load_config(None, ["optim.stochastic_rounding=true"]).optim.stochastic_rounding == "true"
    assert load_config(None, ["optim.stochastic_rounding=false"]).optim.stochastic_rounding == "false"
    cfg = load_config(None, [])
    assert (cfg.optim.state_dtype, cfg.optim.stochastic_rounding) == ("fp32", "auto")
    w = _bf16_ones(8)
    opt = build_optimizer(cfg.optim, [w], torch.device("cpu"), sr_seed=3)
    assert (opt.state_dtype, opt.stochastic_rounding, opt.sr_seed) == ("fp32", True, 3)
    paper = OptimConfig(state_dtype="param", stochastic_rounding="false")
    opt = build_optimizer(paper, [w], torch.device("cpu"))
    assert (opt.state_dtype, opt.stochastic_rounding) == ("param", False)
    with pytest.raises(ConfigError, match=r"optim.stochastic_rounding=true needs bf16 parameters"):
        build_optimizer(OptimConfig(stochastic_rounding="true"), [torch.nn.Parameter(torch.ones(2))],
                        torch.device("cpu"))


@pytest.mark.parametrize("kw, msg", [
    (dict(state_dtype="bf16"), r"Invalid state_dtype: 'bf16' \(must be one of \('fp32', 'param'\)\)"),
    (dict(stochastic_rounding="yes"), r"Invalid stochastic_rounding: 'yes' \(must be True or False\)"),
    (dict(sr_seed=-1), r"Invalid sr_seed: -1 \(must be an int >= 0\)"),
])
@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_constructor_messages(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        cls([_bf16_ones(2)], lr=1e-3, **kw)
