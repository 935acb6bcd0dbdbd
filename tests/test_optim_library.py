"""AM-AdamW / AM-SGD as a drop-in torch.optim library (issue 12): torch.compile, pickling,
foreign state dicts, momentum schedulers, torch's keywords, β introspection.

References are independent of the code under test: eager runs, torch's own optimizers.
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch

from amllm.optim import AMSGD, AMAdamW, _cpu_ext

OPTS = [AMAdamW, AMSGD]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(5, 4, generator=g)).pow(2).sum().backward()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _run(cls, steps, impl=None, compiled=False, seed=0, opt=None, model=None, **kw):
    model = model or _model()
    opt = opt or cls(model.parameters(), lr=0.1, **kw)
    if impl:
        opt.impl = impl
    step = torch.compile(opt.step) if compiled else opt.step
    for i in range(steps):
        _grads(model, seed + i)
        step()
    return model, opt


# -- 1. torch.compile(opt.step) ---------------------------------------------------------------
# ~3 s of Dynamo tracing each: the quick subset keeps one path, the rest are `slow`
@pytest.mark.parametrize("impl", ["forloop", *(pytest.param(i, marks=pytest.mark.slow)
                                              for i in ("foreach", "cpp", "triton"))])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("cls", OPTS)
def test_compiled_step_matches_eager(cls, per_layer, impl):
    if impl == "cpp" and not _cpu_ext.available(torch.device("cpu"), torch.float32):
        pytest.skip("the C++ kernels cannot be built here (the step would run foreach)")
    torch._dynamo.reset()
    eager, e_opt = _run(cls, 3, impl, per_layer=per_layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from the optimizer under compile
        warnings.filterwarnings("ignore", message=".*jit.script_method.*")  # torch's own
        comp, c_opt = _run(cls, 3, impl, compiled=True, per_layer=per_layer)
    assert torch.equal(_flat(eager), _flat(comp))
    assert torch.equal(e_opt.last_beta, c_opt.last_beta)
    assert int(c_opt.beta_state.beta_step.min()) == 3


# -- 2. deepcopy / pickle ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", OPTS)
def test_copy_then_step_continues(cls, how):
    model, opt = _run(cls, 2, per_layer=True, foreach=False, skip_nonfinite=True)
    opt.set_layer_map({p: i for i, p in enumerate(model.parameters())}, 4)
    clone_m, clone = ((copy.deepcopy((model, opt))) if how == "deepcopy"
                      else pickle.loads(pickle.dumps((model, opt))))
    assert clone.impl == "forloop" and clone.skip_nonfinite and clone._explicit_layers is not None
    _run(cls, 2, seed=7, model=model, opt=opt)
    _run(cls, 2, seed=7, model=clone_m, opt=clone)
    assert torch.equal(_flat(model), _flat(clone_m))
    assert torch.equal(opt.last_beta, clone.last_beta)
    assert torch.equal(opt.beta_state.pi, clone.beta_state.pi)


@pytest.mark.parametrize("cls", OPTS)
def test_old_pickle_loads(cls):
    """A pickle of the old layout (torch's three fields only) loads and steps (β state fresh)."""
    model, opt = _run(cls, 1)
    old = {"defaults": dict(opt.defaults), "state": opt.state, "param_groups": opt.param_groups}
    if cls is AMSGD:  # groups of before `momentum`
        for g in [old["defaults"], *old["param_groups"]]:
            g["beta_max"] = g.pop("momentum")
    clone = cls.__new__(cls)
    clone.__setstate__(pickle.loads(pickle.dumps(old)))
    assert clone.impl == "auto" and clone.skip_nonfinite is False
    for g in clone.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    clone.step()
    assert int(clone.beta_state.beta_step[0]) == 1


def test_process_group_reducer_refuses_pickle(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        opt = AMAdamW(_model().parameters(), reducer=dist.group.WORLD)
        with pytest.raises(TypeError, match="ProcessGroup reducer cannot be pickled"):
            pickle.dumps(opt)
        with pytest.raises(TypeError, match="state_dict"):
            copy.deepcopy(opt)
    finally:
        dist.destroy_process_group()


# -- 4. momentum schedulers -------------------------------------------------------------------
@pytest.mark.parametrize("cls", OPTS)
def test_one_cycle_momentum_is_used(cls):
    """OneCycleLR(cycle_momentum=True) drives β_max: with the β forced to β_max-bounded policy
    "restart" (β ≥ θ -> β_max), the β used is the scheduled one, as read back from the groups."""
    model = _model()
    kw = dict(beta_policy="restart", restart_threshold=0.0)  # β = β_max every step
    opt = cls(model.parameters(), lr=0.1, **kw)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=True,
                                                base_momentum=0.5, max_momentum=0.95)
    key = "betas" if cls is AMAdamW else "momentum"
    for i in range(4):
        m = opt.param_groups[0][key]
        m = m[0] if cls is AMAdamW else m
        _grads(model, i)
        opt.step()
        sched.step()
        assert float(opt.last_beta) == pytest.approx(m, abs=1e-6)
    assert float(opt.last_beta) < 0.95  # the schedule moved it


def test_beta_max_must_agree_across_groups_at_step():
    model = _model()
    opt = AMAdamW([{"params": model[0].parameters()}, {"params": model[1].parameters()}])
    opt.param_groups[1]["betas"] = (0.8, 0.999)
    _grads(model, 0)
    with pytest.raises(ValueError, match="optimizer-wide.*cycle_momentum=True"):
        opt.step()


def test_sgd_beta_max_alias_and_old_groups():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert AMSGD(p, lr=0.1, beta_max=0.8).defaults["momentum"] == 0.8
    opt = AMSGD([{"params": p, "beta_max": 0.7}], lr=0.1, momentum=0.7)
    assert opt.param_groups[0]["momentum"] == 0.7 and "beta_max" not in opt.param_groups[0]
    with pytest.raises(ValueError, match="disagree"):
        AMSGD(p, lr=0.1, momentum=0.5, beta_max=0.8)


_ALIAS_CONFLICT = (r"^momentum=0\.5 and beta_max=0\.9 disagree: both set AM-SGD's β_max \(beta_max= is an alias of "
                   r"momentum=\); pass only one of them, preferably momentum= \(torch SGD's name, which momentum "
                   r"schedulers read\)$")


def test_sgd_momentum_alias_rule():
    """β_max is `momentum` or its alias `beta_max`: the alias wins over a momentum at the default 0.9
    (an explicit 0.9 looks like the default); two explicit values that differ are refused, in the
    constructor and in a param group alike (a group with both used to keep one silently)."""
    p = [torch.nn.Parameter(torch.ones(2))]
    assert AMSGD(p, lr=0.1, momentum=0.9, beta_max=0.5).defaults["momentum"] == 0.5
    assert AMSGD(p, lr=0.1, momentum=0.5, beta_max=0.5).defaults["momentum"] == 0.5
    assert AMSGD(p, lr=0.1, momentum=0.5).defaults["momentum"] == 0.5
    with pytest.raises(ValueError, match=_ALIAS_CONFLICT):
        AMSGD(p, lr=0.1, momentum=0.5, beta_max=0.9)
    with pytest.raises(ValueError, match=_ALIAS_CONFLICT):
        AMSGD([{"params": p, "momentum": 0.5, "beta_max": 0.9}], lr=0.1, momentum=0.5)
    opt = AMSGD([{"params": p, "momentum": 0.9, "beta_max": 0.5}], lr=0.1, momentum=0.5)
    assert opt.param_groups[0]["momentum"] == 0.5 and "beta_max" not in opt.param_groups[0]


# -- 4b. the kernel path by name --------------------------------------------------------------
@pytest.mark.parametrize("cls", OPTS)
def test_impl_keyword_and_attribute(cls):
    """`impl=` names the kernel path (the optimizer's IMPLS), validated with torch's message style in
    the constructor and the settable `impl` attribute; it excludes foreach/fused; pickling keeps it,
    a state dict does not carry it (the loading optimizer's own path is kept)."""
    names = ("auto", "forloop", "foreach", "fused", "cpp", *(("compiled",) if cls is AMAdamW else ()), "triton")
    assert cls.IMPLS == names
    for name in names:
        assert cls(_model().parameters(), lr=0.1, impl=name).impl == name
    assert cls(_model().parameters(), lr=0.1, foreach=False).impl == "forloop"
    listed = re.escape(repr(names))
    bad = "compiled" if cls is AMSGD else "cuda"
    with pytest.raises(ValueError, match=rf"^Invalid impl: '{bad}' \(must be one of {listed}\)$"):
        cls(_model().parameters(), lr=0.1, impl=bad)
    opt = cls(_model().parameters(), lr=0.1, impl="forloop")
    with pytest.raises(ValueError, match=rf"^Invalid impl: None \(must be one of {listed}\)$"):
        opt.impl = None
    assert opt.impl == "forloop"
    opt.impl = "foreach"
    assert opt.impl == "foreach" and opt._resolved_impl() == "foreach"
    with pytest.raises(ValueError, match=r"^impl='forloop' and foreach/fused cannot both be given"):
        cls(_model().parameters(), lr=0.1, impl="forloop", foreach=True)
    model, trained = _run(cls, 2, impl="forloop")
    assert pickle.loads(pickle.dumps(trained)).impl == "forloop"
    other = cls(model.parameters(), lr=0.1, impl="foreach")
    other.load_state_dict(trained.state_dict())
    assert other.impl == "foreach"


# -- 5. torch's keywords ----------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw,why", [
    (AMAdamW, dict(capturable=True), "CUDA graphs"), (AMAdamW, dict(differentiable=True), "autograd"),
    (AMAdamW, dict(amsgrad=True), "running max"), (AMSGD, dict(nesterov=True), "Nesterov"),
    (AMSGD, dict(dampening=0.1), "already dampened"),
])
def test_unsupported_keywords_refused_with_reason(cls, kw, why):
    with pytest.raises(ValueError, match=f"^{cls.__name__} does not support {next(iter(kw))}=.*{why}"):
        cls(_model().parameters(), lr=0.1, **kw)
    cls(_model().parameters(), lr=0.1, **{k: type(v)() for k, v in kw.items()})  # defaults accepted


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
@pytest.mark.parametrize("cls", OPTS)
def test_maximize_is_descent_on_negated_loss(cls, impl):
    """maximize=True on f equals minimising -f (independent reference: the sign-flipped loss)."""
    m_max, m_neg = _model(), _model()
    o_max = cls(m_max.parameters(), lr=0.1, maximize=True, per_layer=True)
    o_neg = cls(m_neg.parameters(), lr=0.1, per_layer=True)
    o_max.impl = o_neg.impl = impl
    for i in range(3):
        for m, o, sign in ((m_max, o_max, 1.0), (m_neg, o_neg, -1.0)):
            g = torch.Generator().manual_seed(i)
            m.zero_grad()
            (sign * m(torch.randn(5, 4, generator=g)).pow(2).sum()).backward()
            o.step()
    assert torch.equal(_flat(m_max), _flat(m_neg))
    assert torch.equal(o_max.last_beta, o_neg.last_beta)


def test_torch_adamw_keywords_accepted_at_defaults():
    """AdamW's full keyword set at its defaults constructs (drop-in signature)."""
    AMAdamW(_model().parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
            maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
    AMSGD(_model().parameters(), lr=1e-3, momentum=0.9, dampening=0, weight_decay=0, nesterov=False,
          maximize=False, foreach=None, fused=None)


# -- 3. foreign and mismatched state dicts ----------------------------------------------------
def _one_warning(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    assert len(w) == 1, [str(x.message) for x in w]
    return str(w[0].message)


def test_adamw_state_loads_into_am_adamw_as_d_and_v():
    """AdamW's exp_avg/exp_avg_sq become d and v, β state fresh, this optimizer's settings kept;
    the reference is torch AdamW's own state."""
    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=0.5, betas=(0.5, 0.9), amsgrad=True)
    for i in range(2):
        _grads(model, i)
        adamw.step()
    am = AMAdamW(model.parameters(), lr=0.01, betas=(0.8, 0.99))
    msg = _one_warning(lambda: am.load_state_dict(adamw.state_dict()))
    assert "exp_avg/exp_avg_sq become d and v" in msg
    g = am.param_groups[0]
    assert g["lr"] == 0.01 and g["betas"] == (0.8, 0.99) and "amsgrad" not in g
    for p in model.parameters():
        assert torch.equal(am.state[p]["exp_avg"], adamw.state[p]["exp_avg"])
        assert torch.equal(am.state[p]["exp_avg_sq"], adamw.state[p]["exp_avg_sq"])
        assert set(am.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert int(am.beta_state.beta_step[0]) == 0 and float(am.beta_state.pi[0]) == 1.0
    _grads(model, 5)
    am.step()


@pytest.mark.parametrize("src,dst,msg", [
    (lambda p: AMAdamW(p), lambda p: AMSGD(p, lr=0.1), "AMAdamW state dict into AMSGD: optimizer type"),
    (lambda p: AMSGD(p, lr=0.1), lambda p: AMAdamW(p), "AMSGD state dict into AMAdamW: optimizer type"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: AMSGD(p, lr=0.1),
     "torch SGD state dict into AMSGD: torch SGD's momentum_buffer is β·d \\+ g"),
    (lambda p: AMAdamW(p, per_layer=True), lambda p: AMAdamW(p),
     "AMAdamW state dict with per_layer=True into one with per_layer=False"),
    (lambda p: AMSGD(p, lr=0.1), lambda p: AMSGD(p, lr=0.1, per_layer=True),
     "AMSGD state dict with per_layer=False into one"),
])
def test_mismatched_state_dict_refused_in_one_line(src, dst, msg):
    model = _model()
    a = src(model.parameters())
    _grads(model, 0)
    a.step()
    b = dst(model.parameters())
    with pytest.raises(ValueError, match=f"^cannot load a {msg}") as e:
        b.load_state_dict(a.state_dict())
    assert "\n" not in str(e.value)
    assert len(b.state) == 0  # nothing half-loaded


def test_layer_count_mismatch_refused():
    model = _model()
    a = AMAdamW([{"params": model.parameters(), "layer_per_group": True}], per_layer=True)
    _grads(model, 0)
    a.step()
    b = AMAdamW(model.parameters(), per_layer=True)
    with pytest.raises(ValueError, match="^cannot load a AMAdamW state dict with 1 β layers into one with 4"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("cls", OPTS)
def test_older_am_state_dict_loads_with_one_warning(cls, tmp_path):
    """A dict of before am_state/am_optimizer/momentum loads: β state fresh, one warning; a
    current dict goes through torch.load(weights_only=True)."""
    model, opt = _run(cls, 2)
    sd = opt.state_dict()
    torch.save(sd, tmp_path / "o.pt")
    assert torch.load(tmp_path / "o.pt", weights_only=True)["am_optimizer"] == cls.__name__
    old = copy.deepcopy(sd)
    del old["am_state"], old["am_optimizer"]
    for g in old["param_groups"]:
        g.pop("maximize")
        if cls is AMSGD:
            g["beta_max"] = g.pop("momentum")
    new = cls(model.parameters(), lr=0.1)
    assert "am_state" in _one_warning(lambda: new.load_state_dict(old))
    assert int(new.beta_state.beta_step[0]) == 0
    assert new.param_groups[0]["maximize"] is False
    assert cls is AMAdamW or new.param_groups[0]["momentum"] == 0.9
    new.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(model.parameters(), lr=0.1).load_state_dict(sd)  # a current dict: silent


# -- 6. β introspection -----------------------------------------------------------------------
def test_layer_of_and_beta_by_layer():
    model = _model()
    opt = AMAdamW([{"params": model[0].parameters(), "layer_per_group": True, "name": "block0"},
                   {"params": model[1].parameters()}], per_layer=True)
    _grads(model, 0)
    opt.step()
    w, b = model[1].weight, model[1].bias
    assert [opt.layer_of(p) for p in model.parameters()] == [0, 0, 1, 2]
    beta = opt.last_beta.tolist()  # independent: the raw vector, ordered as layer_of says
    assert opt.beta_by_layer(model.named_parameters()) == {"block0": beta[0], "1.weight": beta[1],
                                                           "1.bias": beta[2]}
    assert opt.beta_by_layer({w: "w"}) == {"block0": beta[0], "w": beta[1], 2: beta[2]}
    assert opt.beta_by_layer() == {"block0": beta[0], 1: beta[1], 2: beta[2]}
    named = AMSGD(model.named_parameters(), lr=0.1, per_layer=True)  # torch's param_names
    assert list(named.beta_by_layer()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    glob = AMSGD(model.parameters(), lr=0.1)
    assert glob.layer_of(b) == 0 and glob.beta_by_layer(model.named_parameters()) == {0: pytest.approx(0.9)}
    with pytest.raises(KeyError):
        glob.layer_of(torch.nn.Parameter(torch.ones(1)))
