"""The generic checks torch applies to its own optimizers, run on AMAdamW and AMSGD through the
public torch.optim API only (no torch private test utilities): state_dict / load_state_dict
hooks, step hooks, closures, zero_grad, frozen and None grads, empty groups, deepcopy, older
state dicts."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from amllm.optim import AMSGD, AMAdamW

MAKERS = {"AMAdamW": lambda p, **kw: AMAdamW(p, lr=0.05, weight_decay=0.01, **kw),
          "AMSGD": lambda p, **kw: AMSGD(p, lr=0.05, weight_decay=0.01, **kw)}
params_of = pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())


def _setup(make, seed=0, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    return model, make(model.parameters(), **kw)


def _loss(model, i=0):
    g = torch.Generator().manual_seed(i)
    return model(torch.randn(6, 3, generator=g)).pow(2).mean()


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()


def _tensors_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


@params_of
def test_state_dict_hooks(make):
    model, opt = _setup(make)
    _train(model, opt, 2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    sd = opt.state_dict()
    assert calls == ["pre"] and sd["extra"] == 1 and "am_state" in sd

    model2, opt2 = _setup(make)
    seen = []

    def load_pre(o, sd):
        seen.append(set(sd))
        sd = dict(sd)
        sd.pop("extra")
        return sd

    opt2.register_load_state_dict_pre_hook(load_pre)
    opt2.register_load_state_dict_post_hook(lambda o: seen.append("post"))
    opt2.load_state_dict(sd)
    assert "extra" in seen[0] and seen[1] == "post"
    assert _tensors_equal(opt2.beta_state.to_dict(), opt.beta_state.to_dict())


@params_of
def test_step_hooks_and_closure(make):
    model, opt = _setup(make)
    ref_model, ref = _setup(make)
    order = []
    opt.register_step_pre_hook(lambda o, a, k: order.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: order.append("post"))
    for i in range(3):
        def closure(i=i):
            opt.zero_grad()
            loss = _loss(model, i)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert torch.is_tensor(loss) and loss.grad_fn is not None
    _train(ref_model, ref, 3)  # the same steps without a closure
    assert order == ["pre", "post"] * 3
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


@params_of
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(make, set_to_none):
    model, opt = _setup(make)
    _loss(model).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.equal(p.grad, torch.zeros_like(p))


@params_of
def test_frozen_and_none_grads_leave_params_and_state_alone(make):
    model, opt = _setup(make, per_layer=True)
    model[0].weight.requires_grad_(False)  # frozen: never a grad
    _train(model, opt, 2)
    frozen = model[0].weight.detach().clone()
    bias = model[2].bias
    bias_before = bias.detach().clone()
    state_before = copy.deepcopy(opt.state[bias])
    opt.zero_grad()
    _loss(model, 5).backward()
    bias.grad = None  # None grad this step
    opt.step()
    assert torch.equal(model[0].weight, frozen) and model[0].weight not in opt.state
    assert torch.equal(bias, bias_before) and _tensors_equal(opt.state[bias], state_before)
    assert not torch.equal(model[2].weight, model[2].weight.detach() * 0)  # the others moved


@params_of
def test_empty_param_group(make):
    model, opt = _setup(make)
    model2, _ = _setup(make)
    opt2 = make([{"params": list(model2.parameters())}, {"params": []}])
    _train(model, opt, 3)
    _train(model2, opt2, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert len(opt2.state_dict()["param_groups"]) == 2


@params_of
def test_deepcopy_has_equal_state(make):
    model, opt = _setup(make)
    _train(model, opt, 2)
    clone = copy.deepcopy(opt)
    assert _tensors_equal(clone.state_dict(), opt.state_dict())
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert all(c is not p for c, p in zip(clone_params, model.parameters()))


@params_of
def test_state_dict_round_trip_continues_bitwise(make):
    model, opt = _setup(make, per_layer=True)
    _train(model, opt, 2)
    model2, opt2 = copy.deepcopy(model), None
    opt2 = make(model2.parameters(), per_layer=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, 2, start=2)
    _train(model2, opt2, 2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@params_of
def test_load_older_state_dict(make):
    """A dict as saved before am_state existed: loads with one warning and continues."""
    model, opt = _setup(make)
    _train(model, opt, 2)
    old = copy.deepcopy(opt.state_dict())
    del old["am_state"], old["am_optimizer"]
    model2 = copy.deepcopy(model)
    opt2 = make(model2.parameters())
    with pytest.warns(UserWarning, match="without am_state"):
        opt2.load_state_dict(old)
    _train(model2, opt2, 1, start=2)
    assert int(opt2.beta_state.beta_step[0]) == 1
