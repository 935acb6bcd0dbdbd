"""What happens to the transformer blocks before a backend wraps the model, in torchtitan's order:
activation checkpointing, then compilation, then sharding / DDP (done by the backend).

* Activation checkpointing (``train.activation_checkpointing``) uses transformers' own per-layer
  mechanism (``activation_checkpointing_enable``, non-reentrant ``torch.utils.checkpoint``): it
  checkpoints a block's ``forward``, so module hooks -- FSDP2's all-gathers -- stay outside the
  checkpoint and parameter names do not change (checkpoints, DCP and HF export are untouched).
* Compilation (``train.compile``) compiles each block's forward (AC included) with
  ``fullgraph=True``: a graph break is an error, not a silent fallback. The hooks of FSDP2 (and
  DDP's gradient hooks) stay outside the compiled region, which is why the forward is compiled
  rather than the module's ``__call__``. Identical blocks share one graph (no recompile per block:
  tests/test_perf.py counts the frames compiled). DeepSpeed compiles its engine itself
  (``engine.compile()`` in ``deepspeed_backend.build_engine``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

AC_MODES = ("none", "full", "selective")


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> list[int]:
    """Checkpoint every block (full) or every ``every``-th block from the first (selective);
    returns the indices of the checkpointed blocks. none: nothing."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing {mode!r}: choose one of {', '.join(AC_MODES)}")
    if mode == "none":
        return []
    k = 1 if mode == "full" else int(every)
    # preserve_rng_state=False: LLaMA has no dropout, so the recompute needs no RNG replay (torchtitan's choice)
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False}, every_n_layers=k)
    blocks = set(map(id, _blocks(model)))
    for module in model.modules():  # only the blocks checkpoint; the decoder itself must not turn its KV cache
        if id(module) not in blocks and hasattr(module, "gradient_checkpointing"):  # off: without one, transformers'
            module.gradient_checkpointing = False  # mask code reads a device value on the host every forward
    return [i for i, b in enumerate(_blocks(model)) if getattr(b, "gradient_checkpointing", False)]


def _block_forward(block: nn.Module, *args, **kwargs):
    # looked up at call time: FSDP2 swaps the block's class (FSDP<Layer>), and transformers' AC
    # wrapper checkpoints only through the outermost class's forward
    if block.training and torch.is_grad_enabled():
        # a training step has no use for the KV cache the decoder passes down (LlamaLM keeps it on only to
        # spare the mask code a host read); without it, the AC wrapper has nothing to warn about -- a
        # logging call inside the compiled graph would be a graph break
        kwargs.update(cache=None, use_cache=False)
    return type(block).forward(block, *args, **kwargs)


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` (fullgraph) each block's forward; the model stays an ordinary module with
    its parameter names. Returns the number of blocks compiled."""
    blocks = _blocks(model)
    for block in blocks:
        block.forward = torch.compile(functools.partial(_block_forward, block), fullgraph=True, **compile_kwargs)
    return len(blocks)


def prepare_blocks(model: nn.Module, train_cfg, compile: bool = True) -> nn.Module:
    """AC then (when ``train.compile`` and ``compile``) per-block compile; before any wrapping."""
    apply_ac(model, train_cfg.activation_checkpointing, train_cfg.ac_every)
    if compile and train_cfg.compile:
        compile_blocks(model)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    from .fsdp import transformer_blocks

    return transformer_blocks(model)
