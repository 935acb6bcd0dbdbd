"""What happens to the transformer blocks before a backend wraps the model, in torchtitan's order:
activation checkpointing, then compilation, then sharding / DDP (done by the backend).

Both act on a block's ``forward`` (an instance attribute calling :func:`_block_forward`), never on
``__call__``: module hooks -- FSDP2's all-gathers and reshards, DDP's gradient hooks -- stay outside the
checkpoint (they do not run again in the recompute) and outside the compiled region, and parameter
names do not change (checkpoints, DCP and HF export are untouched).

* Activation checkpointing (``train.activation_checkpointing``): ``torch.utils.checkpoint`` (non-reentrant,
  no RNG replay: LLaMA has no dropout -- torchtitan's choice) around the block's own forward, applied
  here rather than through transformers' ``activation_checkpointing_enable``/``gradient_checkpointing_enable``,
  whose name, arguments and cache handling differ between the releases we support (5.17 .. 5.25).
* Compilation (``train.compile``): each block's forward (AC included) under ``torch.compile(fullgraph=True)``:
  a graph break is an error, not a silent fallback. The blocks are identical modules and run without a KV
  cache (``model.training_config``), so all of them share ONE graph in training and one in evaluation, at
  any depth (tests/test_depth.py counts the graphs of 8-, 12- and 24-block models). DeepSpeed compiles its
  engine itself (``engine.compile()`` in ``deepspeed_backend.build_engine``).
* :func:`check_compiled_eval` runs one evaluation forward at start-up, so that a compile problem in the
  eval path stops the run in one line before the first step, not at the first evaluation hours later.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model import drop_hub_kernel_routing

AC_MODES = ("none", "full", "selective")
_AC = "_amllm_checkpointed"  # the block attribute that marks a checkpointed block


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers decoder (``model.model.layers`` for LLaMA): the unit that
    AC, compile and FSDP2 act on and that per-block β groups follow."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return list(module)
    raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks (layers/h/blocks)")


def _block_forward(block: nn.Module, *args, **kwargs):
    # looked up at call time: FSDP2 swaps the block's class (FSDP<Layer>) after this was installed
    forward = functools.partial(type(block).forward, block)
    # the flag is read last: evaluation does not look at it, so its graph is shared by all blocks
    if block.training and torch.is_grad_enabled() and getattr(block, _AC, False):
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return forward(*args, **kwargs)


def _install(block: nn.Module) -> None:
    if "forward" not in vars(block):
        block.forward = functools.partial(_block_forward, block)


def _plain_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks, with the model made safe to checkpoint and compile them. ``LlamaLM`` already is
    (``model.training_config``, ``model.drop_hub_kernel_routing``); this also covers a plain transformers
    model handed to us: no KV cache (a checkpointed block would write it again in the recompute, a
    compiled one specialises on its layer index through it) and no hub-kernel routing wrapper (a side
    effect Dynamo refuses inside a checkpoint)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    drop_hub_kernel_routing(model)
    return transformer_blocks(model)


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> list[int]:
    """Checkpoint every block (full) or every ``every``-th block from the first (selective);
    returns the indices of the checkpointed blocks. none: nothing."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing {mode!r}: choose one of {', '.join(AC_MODES)}")
    if mode == "none":
        return []
    k = 1 if mode == "full" else int(every)
    chosen = []
    for i, block in enumerate(_plain_blocks(model)):
        if i % k == 0:
            setattr(block, _AC, True)
            _install(block)
            chosen.append(i)
    return chosen


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` (fullgraph) each block's forward; the model stays an ordinary module with
    its parameter names. Returns the number of blocks compiled."""
    blocks = _plain_blocks(model)
    for block in blocks:
        block.forward = torch.compile(functools.partial(_block_forward, block), fullgraph=True, **compile_kwargs)
    return len(blocks)


def prepare_blocks(model: nn.Module, train_cfg, compile: bool = True) -> nn.Module:
    """AC then (when ``train.compile`` and ``compile``) per-block compile; before any wrapping."""
    apply_ac(model, train_cfg.activation_checkpointing, train_cfg.ac_every)
    if compile and train_cfg.compile:
        compile_blocks(model)
    return model


# What a failed torch.compile raises: Dynamo's own errors (graph breaks under fullgraph, unsupported side
# effects, Inductor failures) and the recompile limit under fullgraph, which is not one of them.
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


def compile_error_line(e: BaseException) -> str:
    """One line for a :data:`COMPILE_ERRORS` error: what failed and how to go on."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return (f"train.compile=true: the model does not compile ({type(e).__name__}: {first[:300]}); "
            f"run with train.compile=false, or set TORCHDYNAMO_VERBOSE=1 for the whole trace")
