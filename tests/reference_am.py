"""Independent float64 oracle for AM-AdamW and AM-SGD, written from the spec lines.

Deliberately naive and separate from ``amllm.optim``: plain Python loops over tensors,
Python-float sums, no foreach, no algebraic rewrites. Imports nothing from amllm.

A parameter is described by (group index, layer index). ``step(grads)`` takes one grad
(or None: skipped this step) per parameter, in order.
"""

from __future__ import annotations

import math

import torch


def _policy(beta, beta_max, policy, beta_min, theta, low):
    if policy == "am":
        return beta
    if policy == "clip":
        return max(beta, beta_min)
    if policy == "restart":
        return beta_max if beta >= theta else low
    raise ValueError(policy)


def _beta_am(num, den, beta_max, first):
    """Returns (β, fallback?)."""
    if first:
        return beta_max, False
    if den > 0 and math.isfinite(num) and math.isfinite(den) and math.isfinite(num / den):
        return min(max(num / den, 0.0), beta_max), False
    return beta_max, True


class _RefBase:
    def __init__(self, params, groups, layer_of, n_layers, beta_max, policy="am", beta_min=0.0,
                 theta=0.7, low=0.1, force_beta=None):
        # params: list of tensors (copied to float64); groups: list of dicts; layer_of[i]: layer
        self.x = [p.detach().double().clone() for p in params]
        self.groups = groups
        self.layer_of = layer_of
        self.L = n_layers
        self.beta_max, self.policy, self.beta_min, self.theta, self.low = beta_max, policy, beta_min, theta, low
        self.force_beta = force_beta
        self.pi = [1.0] * n_layers
        self.last_beta = [beta_max] * n_layers
        self.beta_step = [0] * n_layers
        self.fallback = 0
        self.prev_lr = [None] * len(groups)

    def _ratio(self, gi):
        lr = self.groups[gi]["lr"]
        prev = self.prev_lr[gi]
        return 1.0 if (prev is None or lr == 0) else prev / lr

    def _finish(self, num, den, present):
        betas = []
        for l in range(self.L):
            first = self.beta_step[l] == 0
            b, fb = _beta_am(num[l], den[l], self.beta_max, first)
            b = _policy(b, self.beta_max, self.policy, self.beta_min, self.theta, self.low)
            if self.force_beta is not None:
                b = self.force_beta
            if present[l]:
                self.pi[l] *= b
                self.last_beta[l] = b
                self.beta_step[l] += 1
                self.fallback += int(fb)
            betas.append(b)
        return betas


class RefAMAdamW(_RefBase):
    """groups[i] = dict(lr, weight_decay, eps, beta2, lam); param_group[j] = its group."""

    def __init__(self, params, param_group, groups, layer_of, n_layers, beta_max, **kw):
        super().__init__(params, groups, layer_of, n_layers, beta_max, **kw)
        self.param_group = param_group
        self.d = [torch.zeros_like(x) for x in self.x]
        self.v = [torch.zeros_like(x) for x in self.x]
        self.t = [0] * len(self.x)

    def step(self, grads):
        bm = self.beta_max
        r = [self._ratio(gi) for gi in range(len(self.groups))]
        A = [0.0] * self.L
        B = [0.0] * self.L
        C = [0.0] * self.L
        D = [0.0] * self.L
        present = [False] * self.L
        p_of = {}
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.double()
            hp = self.groups[self.param_group[i]]
            lr, mu, eps, b2, lam = hp["lr"], hp["weight_decay"], hp["eps"], hp["beta2"], hp["lam"]
            l = self.layer_of[i]
            self.t[i] += 1
            if self.x[i].numel() > 0:
                present[l] = True
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            c1 = 1 - bm * self.pi[l]
            c2 = 1 - b2 ** self.t[i]
            p = c1 * (torch.sqrt(self.v[i] / c2) + eps)
            w = 1 / (p * (1 + lam * p))
            d, x = self.d[i], self.x[i]
            delta = d - g
            A[l] += r[self.param_group[i]] * (1 + mu * lr) * float((g * (d / p + mu * x)).sum())
            B[l] += float((w * delta * (g + lam * p * d)).sum())
            C[l] += float((w * delta * delta).sum())
            D[l] += mu * float((delta * x).sum())
            p_of[i] = p
        num = [A[l] - B[l] - D[l] for l in range(self.L)]
        betas = self._finish(num, C, present)
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.double()
            hp = self.groups[self.param_group[i]]
            lr, mu, lam = hp["lr"], hp["weight_decay"], hp["lam"]
            b, p = betas[self.layer_of[i]], p_of[i]
            self.d[i] = (self.d[i] * (b + lam * p) + (1 - b) * g) / (1 + lam * p)
            self.x[i] = self.x[i] * (1 - lr * mu) - lr * self.d[i] / p
        for gi, hp in enumerate(self.groups):
            self.prev_lr[gi] = hp["lr"]
        return betas


class RefAMSGD(_RefBase):
    """groups[i] = dict(lr, weight_decay, lam)."""

    def __init__(self, params, param_group, groups, layer_of, n_layers, beta_max, **kw):
        super().__init__(params, groups, layer_of, n_layers, beta_max, **kw)
        self.param_group = param_group
        self.d = [None] * len(self.x)

    def step(self, grads):
        r = [self._ratio(gi) for gi in range(len(self.groups))]
        num = [0.0] * self.L
        den = [0.0] * self.L
        present = [False] * self.L
        gs = {}
        for i, g in enumerate(grads):
            if g is None:
                continue
            hp = self.groups[self.param_group[i]]
            g = g.double() + hp["weight_decay"] * self.x[i]
            gs[i] = g
            l = self.layer_of[i]
            if self.x[i].numel() > 0:
                present[l] = True
            if self.d[i] is None:
                continue
            lam, d = hp["lam"], self.d[i]
            delta = d - g
            num[l] += (lam + 1) * r[self.param_group[i]] * float((g * d).sum()) - float((delta * (g + lam * d)).sum())
            den[l] += float((delta * delta).sum())
        betas = self._finish(num, den, present)
        for i, g in gs.items():
            hp = self.groups[self.param_group[i]]
            if self.d[i] is None:
                self.d[i] = g.clone()
            else:
                b, lam = betas[self.layer_of[i]], hp["lam"]
                self.d[i] = ((b + lam) * self.d[i] + (1 - b) * g) / (1 + lam)
            self.x[i] = self.x[i] - hp["lr"] * self.d[i]
        for gi, hp in enumerate(self.groups):
            self.prev_lr[gi] = hp["lr"]
        return betas
