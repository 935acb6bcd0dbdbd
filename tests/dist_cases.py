"""Shared pieces of the multi-process tests: a tiny LLaMA, the global batches, the 1-process oracle.

The invariant of the spec's "Sharded execution": β_t (global or per layer), the packed sums
and the losses of N ranks equal, to float32 rounding, ONE process stepping the same global
batch with a plain ``AMAdamW(reducer=None)`` and ``clip_grad_norm_`` -- the reference below,
which knows nothing of DeepSpeed, FSDP or DDP.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

VOCAB, SEQ, GLOBAL_BATCH, MICRO = 128, 16, 8, 2
# lr changes every step (r = η_{t-1}/η_t matters); large enough that per-layer β's leave β_max
LRS = [3e-2, 2e-2, 2.5e-2, 1.5e-2, 1e-2, 2e-2]
CLIP = 1.0


def tiny_llama(seed: int = 0, layers: int = 2):
    """hidden 32; mlp_bias with intermediate 63 gives odd-sized tensors, so flat shards are padded
    (ZeRO-1/2 at the end of the last rank, ZeRO-3 per parameter). 2 blocks for the oracle tests of the
    sharded sums (exact element by element whatever the depth; at lr 3e-2 a deeper model's float32
    trajectories part beyond the sums' element-wise tolerance within 4 steps); the compile and AC cases
    take ``layers=8`` (LLaMA-60M's depth), and train.py's tests run 8-24 blocks (tests/test_depth.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=63, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      tie_word_embeddings=False, mlp_bias=True, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def as_llama_lm(model, loss_chunk: int):
    """amllm's LlamaLM with ``model``'s weights: the loss comes from the model, chunked."""
    from amllm.model import LlamaLM

    lm = LlamaLM(model.config)
    lm.load_state_dict(model.state_dict())
    lm.loss_chunk = loss_chunk
    return lm


def step_loss(model, ids):
    """transformers' shifted loss (labels=ids); for LlamaLM (also inside DDP / a DeepSpeed engine) the same
    loss from amllm's path: positions 0..T-2 of a causal model see the same tokens whether or not the last
    one is fed."""
    from amllm.model import LlamaLM

    if isinstance(getattr(model, "module", model), LlamaLM):
        return model(input_ids=ids[:, :-1], targets=ids[:, 1:])
    return model(input_ids=ids, labels=ids).loss


def param_groups(model, weight_decay: float = 0.1):
    """Two groups, as trainers do: decay on matrices, none on norms and biases."""
    named = list(model.named_parameters())
    return [dict(params=[p for _, p in named if p.dim() >= 2], weight_decay=weight_decay),
            dict(params=[p for _, p in named if p.dim() < 2], weight_decay=0.0)]


def global_batch(step: int) -> torch.Tensor:
    """Arithmetic token sequences (random start and stride): learnable, so the loss falls."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def micro_batches(step: int, rank: int, world: int):
    """This rank's micro-batches of the global batch (any split gives the same mean)."""
    ids = global_batch(step)
    per_rank = GLOBAL_BATCH // world
    mine = ids[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + MICRO] for i in range(0, per_rank, MICRO)]


def eval_batch() -> torch.Tensor:
    return global_batch(10_000)


def reference_run(n_steps: int, per_layer: bool, dtype=torch.float32, one_group: bool = False) -> dict:
    """One process, the whole global batch, plain AMAdamW: the oracle."""
    from amllm.optim import AMAdamW

    torch.set_num_threads(1)
    model = tiny_llama().to(dtype)
    groups = model.parameters() if one_group else param_groups(model)
    opt = AMAdamW(groups, lr=LRS[0], betas=(0.9, 0.99), per_layer=per_layer)
    out = {"loss": [], "beta": [], "sums": [], "eval_loss": []}
    for step in range(n_steps):
        for g in opt.param_groups:
            g["lr"] = LRS[step]
        ids = global_batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["loss"].append(loss.item())
        out["beta"].append(opt.last_beta.detach().double().clone())
        out["sums"].append(opt.last_sums[:, :4].detach().double().clone())
        with torch.no_grad():  # the parameters after this step's update
            out["eval_loss"].append(model(input_ids=eval_batch(), labels=eval_batch()).loss.item())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cli(launcher: str, n: int) -> list[str]:
    """The command that starts train.py on ``n`` local ranks through a real launcher: ``torchrun`` or
    ``deepspeed`` (append the overrides)."""
    import shutil
    import sys
    from pathlib import Path

    if launcher == "deepspeed":
        exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        return [exe, "--num_gpus", str(n), "--master_port", str(free_port()), "train.py"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
            str(free_port()), "train.py"]


def cli_env(**extra: str) -> dict:
    """The environment of such a run: one thread per rank, DeepSpeed's op cache shared across tests."""
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(root / ".torch_extensions")), **extra}


def setup_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the first init_distributed on CPU JIT-builds a small DeepSpeed op (~60 s); build it once
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), ".torch_extensions"))
    torch.set_num_threads(1)
