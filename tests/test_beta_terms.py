"""β telemetry (optim.beta_terms) against a float64 hand computation, and optim.per_layer=block.

The hand computation follows docs/optimizer.md's update line by line in numpy (not the optimizer's
kernels): v, c1, c2, p, w, then A, B, C, D and the three terms a = |d|/|g|, c = cos(d, g), ℓ in the
w-weighted inner product, with β_AM = (1 + ℓ)/(1 + a² − 2ac).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amllm.config import ConfigError, OptimConfig, load_config
from amllm.metrics import beta_term_stats
from amllm.optim import AMAdamW
from amllm.optim_factory import block_groups, build_optimizer

B1, B2, EPS, LAM, WD = 0.9, 0.95, 1e-8, 0.1, 0.01


def _hand_terms(state, grads, lrs, t, pi):
    """Per tensor: Σwg², Σwgd, Σwd², and A−B−D; from the optimizer's state before the step."""
    out = []
    lr_prev, lr = lrs
    r = lr_prev / lr
    for (x, d, v), g, pi_i in zip(state, grads, pi):
        v2 = B2 * v + (1 - B2) * g * g
        p = (1 - B1 * pi_i) * (np.sqrt(v2 / (1 - B2 ** t)) + EPS)
        w = 1 / (p * (1 + LAM * p))
        delta = d - g
        A = r * (1 + WD * lr) * np.sum(g * (d / p + WD * x))
        B = np.sum(w * delta * (g + LAM * p * d))
        D = WD * np.sum(delta * x)
        out.append(np.array([np.sum(w * g * g), np.sum(w * g * d), np.sum(w * d * d), A - B - D]))
    return out


def _terms(s):
    gg, gd, dd, num = s
    if dd == 0:  # the first step (d = 0): the optimizer reports cos = 0
        return np.array([0.0, 0.0, num / gg - 1])
    return np.array([np.sqrt(dd / gg), gd / np.sqrt(dd * gg), num / gg - 1])


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_beta_terms_match_a_float64_hand_computation(impl, per_layer):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(7, dtype=torch.float64))]
    opt = AMAdamW(params, lr=1e-2, betas=(B1, B2), eps=EPS, weight_decay=WD, lam=LAM, per_layer=per_layer, impl=impl)
    opt.beta_terms = True
    lrs = [1e-2, 1e-2, 8e-3, 6e-3, 5e-3]  # a changing lr: r = η_{t-1}/η_t ≠ 1 enters ℓ
    for step in range(5):
        grads = [torch.randn_like(p) * (1 + step) for p in params]
        # before the step: the state the terms are computed from
        if step == 0:
            state = [(p.detach().numpy().copy(), np.zeros(p.shape), np.zeros(p.shape)) for p in params]
        else:
            state = [(p.detach().numpy().copy(), opt.state[p]["exp_avg"].numpy().copy(),
                      opt.state[p]["exp_avg_sq"].numpy().copy()) for p in params]
        pi = opt.state_dict()["am_state"]["pi"].numpy().copy() if step else np.ones(2 if per_layer else 1)
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        got = opt.last_beta_terms.numpy()
        hand = _hand_terms(state, [g.numpy() for g in grads], (lrs[max(step - 1, 0)], lrs[step]), step + 1,
                           pi if per_layer else np.full(2, pi[0]))
        if per_layer:
            want = [_terms(s) for s in hand]
        else:
            want = [_terms(hand[0] + hand[1])]
        for k, w in enumerate(want):
            np.testing.assert_allclose(got[k], w, rtol=1e-9, atol=1e-12)
            if step > 0:  # the identity the telemetry exists for: β = clip((1+ℓ)/(1+a²−2ac), 0, β_max)
                a, c, ell = got[k]
                beta = float(np.clip((1 + ell) / (1 + a * a - 2 * a * c), 0, B1))
                last = opt.last_beta.reshape(-1)[k].item()
                assert last == pytest.approx(beta, rel=1e-9, abs=1e-12)


def test_beta_term_stats_fields():
    terms = torch.tensor([[0.25, -0.5, 0.001], [float("nan"), 0.0, 0.0]])
    assert beta_term_stats(terms[:1], per_layer=False) == {"beta_dg": 0.25, "beta_cos": -0.5,
                                                            "beta_lam": pytest.approx(0.001)}
    per = beta_term_stats(terms, per_layer=True)
    assert per["betas_dg"] == [0.25, None] and per["betas_cos"] == [-0.5, 0.0]
    assert beta_term_stats(None, per_layer=False) == {}


def test_per_layer_values_and_block_groups():
    assert load_config(None, ["optim.per_layer=block"]).optim.per_layer == "block"
    assert load_config(None, ["optim.per_layer=true"]).optim.per_layer is True
    for bad in ("blok", "3"):
        with pytest.raises(ConfigError, match=r"optim.per_layer=.* must be (false, true|true, false)") as e:
            load_config(None, [f"optim.per_layer={bad}"])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="am_adamw/am_sgd only"):
        load_config(None, ["optim.name=adamw", "optim.per_layer=block"])

    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(10, 4)
    model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    model.norm = torch.nn.LayerNorm(4)
    names = {p: n for n, p in model.named_parameters()}
    groups = block_groups(list(model.parameters()), names)
    assert [g["name"] for g in groups] == ["embed", "block0", "block1", "block2", "head"]
    assert [len(g["params"]) for g in groups] == [1, 2, 2, 2, 2]
    opt = build_optimizer(OptimConfig(per_layer="block"), model.parameters(), torch.device("cpu"), names=names)
    assert opt.last_beta.shape == (5,)  # one β per group
    assert opt.layer_of(model.layers[1].weight) == opt.layer_of(model.layers[1].bias) == 2
    with pytest.raises(ConfigError, match="needs the parameters' names"):
        build_optimizer(OptimConfig(per_layer="block"), model.parameters(), torch.device("cpu"))
