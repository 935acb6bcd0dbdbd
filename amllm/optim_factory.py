"""Build the optimizer named in the config: torch's AdamW / SGD or amllm's AM-AdamW / AM-SGD.

One parameter group with weight decay on every tensor, as the paper's LLaMA harness does
(`AdamW(model.parameters(), lr, weight_decay)`). One group also means one flat partition per rank
under DeepSpeed ZeRO-1/2, where the client optimizer is stepped once per group.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .config import OptimConfig


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


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter], device: torch.device,
                    reducer: Any = None) -> torch.optim.Optimizer:
    """`reducer`: where AM statistics are summed (None for one process or DDP; see amllm.optim)."""
    params = [p for p in params if p.requires_grad]
    kw = _impl_kwargs(cfg, device)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, **kw)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.beta1, weight_decay=cfg.weight_decay,
                               **{k: v for k, v in kw.items() if k != "fused" or device.type != "cpu"})
    from .optim import AMAdamW, AMSGD

    am = dict(lam=cfg.lam, per_layer=cfg.per_layer, beta_policy=cfg.beta_policy, beta_min=cfg.beta_min,
              restart_threshold=cfg.restart_threshold, restart_low=cfg.restart_low, reducer=reducer)
    if cfg.name == "am_adamw":
        opt = AMAdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      weight_decay=cfg.weight_decay, **am, **kw)
    else:
        opt = AMSGD(params, lr=cfg.lr, beta_max=cfg.beta1, weight_decay=cfg.weight_decay, **am, **kw)
    if cfg.impl == "triton":  # the accelerator path by name (functional.IMPLS), e.g. on CPU under TRITON_INTERPRET=1
        opt._impl = "triton"
    return opt


def last_beta(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The AM optimizer's β of the last step (None for torch's optimizers)."""
    return getattr(optimizer, "last_beta", None)
