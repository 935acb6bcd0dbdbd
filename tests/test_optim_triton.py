"""The accelerator path's dispatch contract (Triton kernels; interpreted on CPU tensors, or on
``AMLLM_TEST_DEVICE``): launches and dispatched ops independent of the tensor count, no
host read in steady state, step counters where the optimizer keeps them; and the skip
protocol (``found_inf``, ``skip_nonfinite``) on every path against the float64 oracle."""

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amllm.optim import AMSGD, AMAdamW, _triton
from amllm.optim import functional as F
from host_sync import HostReads
from reference_am import RefAMAdamW, RefAMSGD


class OpCount(TorchDispatchMode):
    """Counts aten ops dispatched (what a CUDA run would queue, plus host-side ops)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _setup(cls, n, device, per_layer=False, impl="triton", seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3 + k % 5, 4, generator=gen).to(device)) for k in range(n)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    opt = cls(params, lr=1e-2, weight_decay=0.1, per_layer=per_layer, fused=True, **kw)
    opt.impl = impl
    return opt, params


def _new_grads(params, t):
    """New values in the same grad tensors (addresses stay: the tables are cached)."""
    gen = torch.Generator().manual_seed(100 + t)
    with torch.no_grad():
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=gen) * (1.0 if t % 3 else -0.5))


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
@pytest.mark.parametrize("per_layer", [False, True])
def test_launches_and_ops_do_not_grow_with_the_tensor_count(cls, per_layer, triton_device):
    counts = {}
    for n in (6, 24):
        opt, params = _setup(cls, n, triton_device, per_layer=per_layer)
        for t in range(2):  # state allocation; AM-SGD's first step (d <- g); tables built
            _new_grads(params, t)
            opt.step()
        _new_grads(params, 2)
        before = _triton.launches
        with OpCount() as ops:
            opt.step()
        counts[n] = (_triton.launches - before, len(ops.ops))
    assert counts[6][0] == counts[24][0] == 3, counts  # pass 1, per-layer sums, pass 2
    assert counts[24][1] <= 1.5 * counts[6][1], counts


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0])
@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_no_host_reads_in_steady_state(cls, per_layer, found_inf, skip_nonfinite, triton_device):
    opt, params = _setup(cls, 5, triton_device, per_layer=per_layer, skip_nonfinite=skip_nonfinite)
    for t in range(2):
        _new_grads(params, t)
        opt.step()
    if found_inf is not None:
        opt.found_inf = torch.tensor(found_inf, device=triton_device)
    with HostReads() as reads:
        for t in range(2, 4):
            opt.step()
    assert reads.count == 0, reads.where


def test_host_read_counter_sees_a_planted_item(monkeypatch, triton_device):
    """The test of the test: one ``.item()`` planted in the step is counted."""
    opt, params = _setup(AMAdamW, 5, triton_device)
    opt.step()
    real = F.finish_beta

    def finish_beta_with_item(packed, *a, **k):
        packed.sum().item()
        return real(packed, *a, **k)

    monkeypatch.setattr(F, "finish_beta", finish_beta_with_item)
    with HostReads() as reads:
        opt.step()
    assert reads.count == 1 and "test_optim_triton.py" in reads.where[0]


def test_step_counters_live_on_the_param_device_also_after_loading(triton_device):
    opt, params = _setup(AMAdamW, 4, triton_device)
    for t in range(2):
        _new_grads(params, t)
        opt.step()
    for p in params:
        st = opt.state[p]["step"]
        assert st.device == params[0].device and st.dtype == torch.float32 and float(st) == 2.0
    sd = copy.deepcopy(opt.state_dict())  # as through a file (state_dict() shares the state dicts)
    for st in sd["state"].values():  # a checkpoint written elsewhere: other dtype (and device)
        st["step"] = st["step"].to("cpu", torch.float64)
    opt2, params2 = _setup(AMAdamW, 4, triton_device)
    with torch.no_grad():
        for a, b in zip(params2, params):
            a.copy_(b)
    opt2.load_state_dict(sd)
    for p in params2:
        st = opt2.state[p]["step"]
        assert st.device == p.device and st.dtype == torch.float32 and float(st) == 2.0
    _new_grads(params2, 2)
    _new_grads(params, 2)
    with HostReads() as reads:
        opt2.step()
    assert reads.count == 0, reads.where
    opt.step()
    for a, b in zip(params2, params):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the skip protocol, every path
SKIP_IMPLS = {AMAdamW: ["forloop", "foreach", "fused", "compiled", "triton"],
              AMSGD: ["forloop", "foreach", "fused", "triton"]}
SKIP_CASES = [(cls, impl) for cls in (AMAdamW, AMSGD) for impl in SKIP_IMPLS[cls]]
SHAPES = [(4, 5), (6,), (3, 3)]


def _snapshot(opt, params):
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for v in opt.state[p].values()]
    out += [v.clone() for v in opt.beta_state.to_dict().values()]
    return out


@pytest.mark.parametrize("cls,impl", SKIP_CASES)
@pytest.mark.parametrize("how", ["found_inf", "nan_grad"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_skipped_step_changes_nothing_and_the_next_matches_the_oracle(cls, impl, how, per_layer, request):
    device = request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params = [torch.nn.Parameter(x.to(device, torch.float32)) for x in init]
    hp = dict(lr=0.0, weight_decay=0.1, lam=0.1)
    opt = cls(params, per_layer=per_layer, skip_nonfinite=how == "nan_grad", fused=True, **hp)
    opt.impl = impl
    n_layers = len(SHAPES) if per_layer else 1
    layer_of = list(range(len(SHAPES))) if per_layer else [0] * len(SHAPES)
    if cls is AMAdamW:
        ref = RefAMAdamW(init, [0] * 3, [dict(hp, eps=1e-8, beta2=0.999)], layer_of, n_layers, beta_max=0.9)
    else:
        ref = RefAMSGD(init, [0] * 3, [dict(hp)], layer_of, n_layers, beta_max=0.9)
    mean = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    for t in range(7):
        lr = 0.02 * (1 + t) / 7  # changing: the stored previous lr matters
        opt.param_groups[0]["lr"] = ref.groups[0]["lr"] = lr
        grads = [(1.0 if t % 3 else -0.5) * m + torch.randn(m.shape, generator=gen, dtype=torch.float64)
                 for m in mean]
        for p, g in zip(params, grads):
            p.grad = g.to(device, torch.float32)
        skip = t == 4
        if skip and how == "found_inf":
            opt.found_inf = torch.ones((), device=device)
        if skip and how == "nan_grad":
            params[1].grad[2] = float("nan")
        before = _snapshot(opt, params)
        opt.step()
        opt.found_inf = None
        assert bool(opt.last_skipped) == skip
        if skip:
            after = _snapshot(opt, params)
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            ref.prev_lr[0] = lr  # documented: a skipped step still advances the stored previous lr
            continue
        ref.step(grads)
        torch.testing.assert_close(opt.beta_state.last_beta.cpu().double(),
                                   torch.tensor(ref.last_beta, dtype=torch.float64), rtol=2e-5, atol=2e-6)
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().cpu().double(), ref.x[i], rtol=2e-5, atol=2e-6)
        if cls is AMAdamW:
            assert all(float(opt.state[p]["step"]) == ref.t[i] for i, p in enumerate(params))


@pytest.mark.parametrize("impl", SKIP_IMPLS[AMSGD])
def test_skipped_first_step_creates_no_buffer(impl, request):
    device = request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")
    params = [torch.nn.Parameter(torch.ones(4, device=device))]
    params[0].grad = torch.ones(4, device=device)
    opt = AMSGD(params, lr=0.1, fused=True)
    opt.impl = impl
    opt.found_inf = torch.ones((), device=device)
    opt.step()
    assert "momentum_buffer" not in opt.state[params[0]] and torch.all(params[0] == 1)
    assert int(opt.beta_state.beta_step[0]) == 0


# ------------------------------------------------------------------ routing and fallbacks
def test_routing(triton_device):
    """triton: contiguous tensors of one dtype with their grads/state; non-contiguous ->
    for-loop lines; a grad of another dtype -> foreach."""
    ts = [torch.zeros(4, 3, device=triton_device), torch.zeros(3, 4, device=triton_device).t(),
          torch.zeros(5, device=triton_device), torch.zeros(2, device=triton_device)]
    grads = [torch.zeros_like(ts[0]), torch.zeros(4, 3, device=triton_device), torch.zeros_like(ts[2]),
             torch.zeros(2, device=triton_device, dtype=torch.float64)]
    dev = ts[0].device
    assert F._buckets(4, ts, [0] * 4, "triton", (grads,)) == {
        ("triton", dev, torch.float32): [0, 2], ("forloop", None, None): [1], ("foreach", dev, torch.float32): [3]}


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_unavailable_triton_warns_once_and_runs_foreach(cls, monkeypatch):
    """On CPU without TRITON_INTERPRET (or when the kernels fail to build), impl="triton"
    warns once and is bit-identical to foreach."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_triton, "_STATUS", {})
    runs = []
    for impl in ("triton", "foreach"):
        opt, params = _setup(cls, 4, "cpu", impl=impl)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for t in range(3):  # (AM-SGD's first step has no bucket yet)
                _new_grads(params, t)
                opt.step()
        msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
        if impl == "triton":
            assert len(msgs) == 1 and "Triton" in msgs[0] and "TRITON_INTERPRET=1" in msgs[0], msgs
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken():
        raise RuntimeError("no triton backend")

    monkeypatch.setattr(_triton, "_KERNELS", {})
    monkeypatch.setattr(_triton, "_define", broken)
    monkeypatch.setattr(_triton, "unavailable_reason", lambda device: None)  # (on a GPU run: compiled-mode triton)
    opt, params = _setup(cls, 4, "cpu")
    with pytest.warns(RuntimeWarning, match="no triton backend"):
        opt.step()
        opt.step()


# ------------------------------------------------------------------ the compiled (GPU) build, without a GPU
_COMPILE_SCRIPT = r"""
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from amllm.optim import _triton
mode = int(sys.argv[1])
tables = {"xs", "gs", "ds", "vs", "steps", "numel", "layer", "chunk_t", "chunk_s", "order", "lstart", "align"}
ptrs = {"c1": "*fp32", "beta": "*fp32", "part": "*fp32", "skip": "*i1", "wchunk": "*fp64", "counts": "*fp64",
        "out": "*fp64"}
common = dict(DT=tl.bfloat16, CT=tl.float32, CHUNK=_triton.CHUNK, BLOCK=_triton.BLOCK, ALIGN=mode)
consts = {"adamw_pass1": dict(common, WITH_X=True, K=5, FIX_BF16=False),
          "adamw_pass2": dict(common, HAS_SKIP=True, FIX_BF16=False),
          "sgd_pass1": dict(common, WITH_X=True),
          "sgd_pass2": dict(common, HAS_SKIP=True, FIX_BF16=False),
          "layer_sums": dict(K=5, KP=8, RB=_triton.RBLOCK)}
kernels = _triton.kernels()
out = {}
for name, const in consts.items():
    fn = kernels[name]
    sig = {a: "constexpr" if a in const else "*i64" if a in tables else ptrs.get(a, "fp32") for a in fn.arg_names}
    ptx = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4}).asm["ptx"]
    out[name] = [len(re.findall(r"ld\.global[\.\w]*\.v4", ptx)), len(re.findall(r"ld\.global", ptx))]
print(json.dumps(out))
"""


def test_kernels_compile_for_hopper():
    """Every kernel compiles for sm_90 with Triton's bundled ptxas, no GPU needed (the
    interpreter never compiles: this catches what only the compiler rejects), in each alignment
    mode: ALIGN=1 (every tensor of the bucket aligned) uses 128-bit loads, ALIGN=0 none, and
    ALIGN=2 (mixed bucket, decided per tensor) holds both bodies: 128-bit loads, and more loads
    than ALIGN=1 (the per-element body). In fresh processes: compiled mode needs triton imported
    without TRITON_INTERPRET."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    counts = {}
    for mode in (0, 1, 2):
        run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(mode)], env=env, cwd=root,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        counts[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    for name in counts[0]:
        if name == "layer_sums":
            continue
        (v4_0, _), (v4_1, all_1), (v4_2, all_2) = counts[0][name], counts[1][name], counts[2][name]
        assert v4_0 == 0 and v4_1 > 0 and v4_2 > 0, (name, counts)
        assert all_2 > all_1, (name, counts)  # the per-element body is there too


def test_import_order_mismatch_is_reported(monkeypatch):
    """triton decorates its own library when first imported: kernels in the other mode
    cannot run, and the reason says so (instead of an obscure interpreter error)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.sum, InterpretedFunction):  # this process: interpreted -> compiled mode is out
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        device = torch.device("cuda")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    assert "first imported" in _triton.unavailable_reason(device)


def test_trainer_config_selects_the_triton_path():
    """optim.impl=triton (AM optimizers only) forces the Triton kernels in the trainer."""
    from amllm.config import ConfigError, OptimConfig
    from amllm.optim_factory import build_optimizer

    for name in ("am_adamw", "am_sgd"):
        opt = build_optimizer(OptimConfig(name=name, impl="triton"), [torch.nn.Parameter(torch.zeros(3))],
                              torch.device("cpu"))
        assert opt._resolved_impl() == "triton"
    with pytest.raises(ConfigError, match="optim.impl=triton applies to am_adamw/am_sgd only"):
        OptimConfig(name="adamw", impl="triton")
