"""AM-AdamW: AdamW whose first-moment coefficient β is solved for every step."""

from __future__ import annotations

from typing import Optional

import torch

from ._base import AMOptimizerBase, _check, eager_step, refuse, signed_grads, validate_common
from .functional import ADAMW_IMPLS, AdamWGroup, adamw_beta_sums, am_adamw, beta_terms
from .reduce import local


class AMAdamW(AMOptimizerBase):
    r"""AM-AdamW (Adaptive Memory AdamW).

    From "Adaptive Memory Momentum via a Model-Based Framework for Deep Learning
    Optimization", Topollai & Choromanska, arXiv 2510.04988 (Section 3.3, Appendix D).
    The contract is ``docs/optimizer.md``. Per step, with this step's
    gradient g, moments d (zero-initialised) and v, lr η_t, weight decay μ::

        v   ← β2 v + (1 - β2) g²
        c1  = 1 - β_max · π                  (π: running product of past β's, 1 at start)
        c2  = 1 - β2^t
        p   = c1 · (sqrt(v / c2) + ε)
        w   = 1 / (p (1 + λ p))
        δ   = d - g
        r   = η_{t-1} / η_t                  (1 on the first step or when η_t = 0)
        A   = r (1 + μ η_t) · Σ g·(d / p + μ x)
        B   = Σ w·δ·(g + λ p d)
        C   = Σ w·δ·δ
        D   = μ · Σ δ·x
        β   = β_max                              on the first step
            = clip((A - B - D) / C, 0, β_max)    if C > 0 and the ratio is finite
            = β_max                              otherwise (fallback; counted)
        β   ← policy(β)                       "am" | "clip": max(β, β_min)
                                              | "restart": β_max if β ≥ θ else restart_low
        d   ← (d (β + λ p) + (1 - β) g) / (1 + λ p)
        x   ← x (1 - η_t μ) - η_t d / p
        π   ← π · β

    Σ runs over every element sharing the β: all parameters of all param groups
    (global, default) or one layer (``per_layer=True``: one parameter tensor, or a whole
    param group with ``layer_per_group=True``). Groups may have different lr and weight
    decay: A and D are per-element sums, so each group contributes with its own η, μ and
    r (A = Σ_groups r_g (1 + μ_g η_g) Σ_{group} g·(d/p + μ_g x)). With λ = 0 and β forced
    to β1 this is exactly ``torch.optim.AdamW(betas=(β1, β2))``.

    Args:
        params: iterable of parameters or param groups. Per-group keys: ``lr``,
            ``betas`` (only β2 may differ between groups), ``eps``, ``weight_decay``,
            ``lam``, ``layer_per_group``, ``maximize``. β_max is the groups' ``betas[0]`` at
            step time (a momentum scheduler may change it) and must be equal in all groups.
        lr: η (LR schedulers change ``group["lr"]`` as usual).
        betas: (β_max, β2); β_max takes AdamW's β1 place.
        eps: ε. weight_decay: μ (decoupled). lam: λ ≥ 0, the proximal weight.
        per_layer: one β per layer instead of one global β.
        beta_policy: "am", "clip" or "restart"; beta_min, restart_threshold (θ),
            restart_low: their parameters.
        reducer: how partial sums are summed over ranks (see ``amllm.optim.reduce``):
            None (single process / DDP; automatic for DTensor params), a ProcessGroup
            (ZeRO flat shards, parameter subsets) or a callable ``reduce(t) -> t``.
        foreach: True: multi-tensor ``torch._foreach_*`` path; False: the readable
            per-tensor path.
        fused: True: two fused passes over memory, no temporaries: on CPU the C++
            kernels (``csrc/am_cpu.cpp``, one call per pass for all tensors; built once
            per machine, ~25 s, cached in ``$TORCH_EXTENSIONS_DIR``; where that fails the
            per-tensor ``torch.compile``d kernels), on CUDA the multi-tensor Triton kernels
            (``_triton.py``: three launches per param group and step, no host sync);
            whatever cannot be built falls back to foreach with one warning.
            With neither given ("auto"): fused for models of ≥ 2^20 elements
            (``_FUSED_MIN_NUMEL``), foreach below.
        impl: the kernel path by name instead of foreach/fused: "auto", "forloop",
            "foreach", "fused", or one fused path forced where it can run: "cpp",
            "compiled" (the torch.compile'd kernels), "triton" (on CPU tensors under
            ``TRITON_INTERPRET=1``). Also the ``impl`` attribute (settable, validated).
        state_dtype: "fp32" (default): d and v of bf16/fp16 parameters are float32 (8 bytes
            per parameter instead of 4); "param": the parameter dtype, as torch AdamW (a bf16 v
            at 1.0 does not decay under β2 = 0.999: 0.999 rounds to 1 in bf16's 8 bits).
        stochastic_rounding: write bf16 parameters back with stochastic rounding (default
            True; other dtypes are not affected). With bf16 parameters and no float32 master
            copy the step is computed in float32 and then rounded::

                x_bf16 ← SR(x_fp32_new),  E[SR(y)] = y,  SR(y) ∈ {⌊y⌋_bf16, ⌈y⌉_bf16}

            (``rounding.py``: 16 random bits added to the float32 pattern, then truncated), so
            updates below half the bf16 spacing still move the weight in expectation.
        sr_seed: seed of SR's counter-based random bits, keyed by (sr_seed, the optimizer's SR
            step counter, the tensor's index among all parameters): reproducible, resumable
            (the counter is ``state_dict()["am_state"]["sr_step"]``), no host read.
        skip_nonfinite: skip a step whose all-reduced sums are not all finite (a NaN/inf
            gradient on any rank), on every rank alike. See also ``found_inf``.
        maximize: ascend (the gradient is negated; per group).
        capturable, differentiable, amsgrad: torch AdamW's; only the default False is
            accepted (the error says why).

    Attributes: ``last_beta`` (0-d or ``[n_layers]`` tensor on device; ``layer_of(param)``
    indexes it, ``beta_by_layer(names)`` labels it as a dict of floats),
    ``fallback_count`` (0-d int64 tensor), ``last_sums`` ([L, 5] = A, B, C, D, count),
    ``found_inf`` (set by the caller before ``step()``: a 0-d tensor, nonzero skips the whole
    step, as GradScaler's; the reducer is still called), ``skip_nonfinite``,
    ``last_skipped`` (0-d bool tensor on device), ``beta_terms`` (bool, default False: also
    compute per step why β is what it is, at the cost of one more pass over g, d, v and, sharded,
    one more all-reduce of ``[L, 4]``) and then ``last_beta_terms`` (``[L, 3]`` on device:
    a = |d|/|g|, c = cos(d, g) in the w-weighted inner product and ℓ, the rest of the numerator;
    β_AM = (1 + ℓ)/(1 + a² − 2ac) before the clip: ``functional.adamw_beta_sums``). A skipped step changes nothing but the
    group's stored previous lr (see docs/optimizer.md).

    State: per param ``step`` (0-d float32 tensor on the parameter's device), ``exp_avg`` (d) and
    ``exp_avg_sq`` (v) in ``state_dtype_for(param)`` (the parameter dtype, as AdamW, except float32
    for bf16/fp16 parameters under ``state_dtype="fp32"``); per β ``pi``, ``last_beta``,
    ``beta_step`` and the ``fallback_count``, and the SR counter ``sr_step``, in ``state_dict()["am_state"]``;
    the previous lr per group in ``param_groups[i]["prev_lr"]``.
    """

    _name = "AMAdamW"
    IMPLS = ("auto", *ADAMW_IMPLS)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lam: float = 0.1,
        per_layer: bool = False,
        beta_policy: str = "am",
        beta_min: float = 0.0,
        restart_threshold: float = 0.7,
        restart_low: float = 0.1,
        reducer=None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        skip_nonfinite: bool = False,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        amsgrad: bool = False,
        *,
        impl: Optional[str] = None,
        state_dtype: str = "fp32",
        stochastic_rounding: bool = True,
        sr_seed: int = 0,
    ):
        refuse(self._name, "capturable", capturable, False,
               "a step runs host-side bookkeeping (lr ratio, group walk) that CUDA graphs cannot capture; "
               "its counters and β state already live on the device, and the fused kernels read no host value")
        refuse(self._name, "differentiable", differentiable, False,
               "the step runs fused kernels under no_grad; autograd through the β solve is not supported")
        refuse(self._name, "amsgrad", amsgrad, False,
               "β and the bias correction are solved for AdamW's v; a running max of v is another method")
        self._validate_group(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lam=lam))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lam=lam,
                        per_layer=per_layer, beta_policy=beta_policy, beta_min=beta_min,
                        restart_threshold=restart_threshold, restart_low=restart_low,
                        maximize=bool(maximize))
        super().__init__(params, defaults, reducer=reducer, foreach=foreach, fused=fused,
                         skip_nonfinite=skip_nonfinite, impl=impl, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed)
        self.beta_terms = False

    # beta_terms is a setting: kept by pickling/deepcopy (False for pickles from before it existed);
    # last_beta_terms is the last step's output, rebuilt by the next step
    _PICKLED = {**AMOptimizerBase._PICKLED, "beta_terms": False}
    last_beta_terms = None

    def _beta_max(self, group: dict) -> float:
        return group["betas"][0]

    def _validate_group(self, group: dict) -> None:
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas} (must be (beta_max, beta2))")
        validate_common(group["lr"], betas[0], group["lam"], group["weight_decay"])
        _check(0.0 <= betas[1] < 1.0, "beta2", betas[1], "in [0, 1)")
        _check(group["eps"] > 0.0, "eps", group["eps"], "> 0")

    @eager_step
    @torch.no_grad()
    def step(self, closure=None):
        """One AM-AdamW step. Params whose grad is None are skipped (state untouched)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layers, _ = self._layers()
        reduce = self._reducer()
        groups, steps = [], []
        sr_step, index = self._next_sr_step(), -1
        for group in self.param_groups:
            g = AdamWGroup([], [], [], [], [], [], lr=group["lr"], lr_ratio=self._take_lr_ratio(group),
                           weight_decay=group["weight_decay"], eps=group["eps"], beta2=group["betas"][1],
                           lam=group["lam"])
            keys = []
            for p in group["params"]:
                index += 1  # over all parameters, with a gradient or not: a tensor's SR key is stable
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AMAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=self._step_device(p))
                    state["exp_avg"] = self._new_moment(p)  # float32 for bf16/fp16 params (state_dtype)
                    state["exp_avg_sq"] = self._new_moment(p)
                g.params.append(local(p))
                g.grads.append(local(p.grad))
                g.exp_avgs.append(local(state["exp_avg"]))
                g.exp_avg_sqs.append(local(state["exp_avg_sq"]))
                g.steps.append(state["step"])  # before this step: the kernels use step + 1
                g.layers.append(layers[p])
                g.weights.append(self._weight(p))
                keys.append(self._sr_key(p, sr_step, index))
            g.sr_keys = keys if any(k is not None for k in keys) else None
            g.grads = signed_grads(g.grads, group)
            steps += g.steps
            groups.append(g)
        if self.beta_terms:  # before the step: it overwrites d and v
            sums = adamw_beta_sums(groups, self._get_beta_state(), self._beta_config().beta_max)
            sums = reduce(sums) if reduce is not None else sums
        self._beta_state, self.last_sums, skip = am_adamw(
            groups, self._get_beta_state(), self._beta_config(), reduce=reduce, impl=self._resolved_impl(),
            force_beta=self._force_beta, found_inf=self.found_inf, skip_nonfinite=self.skip_nonfinite)
        if self.beta_terms:
            self.last_beta_terms = beta_terms(sums, self.last_sums)
        self._record_skip(skip, steps)
        return loss
