"""Build the optimizer named in the config: torch's AdamW / SGD or amllm's AM-AdamW / AM-SGD.

One parameter group with weight decay on every tensor, as the paper's LLaMA harness does
(`AdamW(model.parameters(), lr, weight_decay)`). One group also means one flat partition per rank
under DeepSpeed ZeRO-1/2, where the client optimizer is stepped once per group.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

from .config import ConfigError, OptimConfig


def _impl_kwargs(cfg: OptimConfig, device: torch.device) -> dict:
    if cfg.impl == "auto":
        # on CUDA torch's fused AdamW/SGD: they skip a non-finite step on the device (optimizer.found_inf,
        # the GradScaler protocol), where torch's default foreach path needs a host read to skip
        return {"fused": True} if device.type == "cuda" and cfg.name in ("adamw", "sgd") else {}
    if cfg.impl == "forloop":
        return {"foreach": False}
    if cfg.impl == "foreach":
        return {"foreach": True}
    return {"fused": True}


def block_groups(params: list[torch.nn.Parameter], names: dict) -> list[dict]:
    """optim.per_layer=block: one param group, hence one β (layer_per_group), per transformer block
    (`...layers.<i>.`); the embedding and the rest (final norm, head) one group each. Every group keeps
    the optimizer's lr and weight decay, so the update is the per-tensor one but for the β's."""
    groups: dict[str, list] = {}
    for p in params:
        name = names.get(p, "")
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        groups.setdefault(f"block{m.group(1)}" if m else "embed" if "embed" in name else "head", []).append(p)
    return [{"params": ps, "name": k, "layer_per_group": True} for k, ps in groups.items()]


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter], device: torch.device,
                    names: Optional[dict] = None, sr_seed: int = 0) -> torch.optim.Optimizer:
    """The AM optimizers take no reducer here: DDP needs none, FSDP2's DTensor parameters reduce over
    their mesh, and DeepSpeed's adapter builds its own inner optimizer with the data-parallel group.
    ``names`` ({param: name}) is needed by optim.per_layer=block only; ``sr_seed``: the AM optimizers'
    stochastic-rounding seed (the trainers pass train.seed)."""
    params = [p for p in params if p.requires_grad]
    if cfg.stochastic_rounding == "true" and cfg.name.startswith("am_"):
        dtypes = {p.dtype for p in params}
        if torch.bfloat16 not in dtypes:
            raise ConfigError(f"optim.stochastic_rounding=true needs bf16 parameters (train.precision=bf16_pure); "
                             f"these are {sorted(map(str, dtypes))}: use auto or false")
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, **_impl_kwargs(cfg, device))
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.beta1, weight_decay=cfg.weight_decay,
                               **{k: v for k, v in _impl_kwargs(cfg, device).items()
                                  if k != "fused" or device.type != "cpu"})
    from .optim import AMAdamW, AMSGD

    # optim.impl's values are the AM optimizers' own impl names (triton: also on CPU under TRITON_INTERPRET=1)
    per_layer = bool(cfg.per_layer)
    if cfg.per_layer == "block":
        if names is None:
            raise ConfigError("optim.per_layer=block needs the parameters' names, which this backend does not "
                              "pass (DeepSpeed); use optim.per_layer=true, or parallel.backend=ddp|fsdp2")
        params = block_groups(params, names)
    # bf16 parameters: moments in cfg.state_dtype, stochastic rounding unless switched off (auto: on exactly for
    # bf16 parameters, the only ones it affects)
    am = dict(lam=cfg.lam, per_layer=per_layer, beta_policy=cfg.beta_policy, beta_min=cfg.beta_min,
              restart_threshold=cfg.restart_threshold, restart_low=cfg.restart_low, impl=cfg.impl,
              state_dtype=cfg.state_dtype, stochastic_rounding=cfg.stochastic_rounding != "false", sr_seed=sr_seed)
    if cfg.name == "am_adamw":
        opt = AMAdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      weight_decay=cfg.weight_decay, **am)
        opt.beta_terms = cfg.beta_terms
        return opt
    return AMSGD(params, lr=cfg.lr, beta_max=cfg.beta1, weight_decay=cfg.weight_decay, **am)


def last_beta(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The AM optimizer's β of the last step (None for torch's optimizers)."""
    return getattr(optimizer, "last_beta", None)
