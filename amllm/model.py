"""LLaMA models from `configs/models/*.json`, built with transformers' `LlamaForCausalLM`.

The JSON files carry the paper's Table E.3 shapes (20M .. 1B) in Hugging Face `LlamaConfig`
keys, so a trained model exports to the HF format unchanged (tools/export_hf.py). The model
knows nothing about distribution: `amllm/parallel/` wraps it (DDP, FSDP2, DeepSpeed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from .config import ConfigError, ModelConfig

MODELS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def model_config_path(name: str) -> Path:
    """`llama_60m` -> configs/models/llama_60m.json; a path to a JSON file is used as is."""
    p = Path(name)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise ConfigError(f"model.name={name!r}: file not found; give a JSON path or a name from {MODELS_DIR}")
        return p
    p = MODELS_DIR / f"{name}.json"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in MODELS_DIR.glob("*.json")))
        raise ConfigError(f"model.name={name!r} is unknown; choose one of {known} or give a JSON path")
    return p


def load_llama_config(cfg: ModelConfig, vocab_size: int, eos_id: int | None = None,
                      seq_len: int | None = None) -> LlamaConfig:
    """LlamaConfig from the JSON, with the vocabulary taken from the tokenizer.

    The paper's JSONs say vocab 32000 (a LLaMA/T5-style 32k tokenizer). The vocabulary must
    match the tokenizer actually used, so `vocab_size` (from the data manifest) wins.
    """
    path = model_config_path(cfg.name)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix the model config") from None
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    if raw.pop("model_type", "llama") != "llama":
        raise ConfigError(f"{path}: model_type must be 'llama'")
    raw["vocab_size"] = int(vocab_size)
    if eos_id is not None:
        raw["eos_token_id"] = int(eos_id)
    try:
        hf = LlamaConfig(**raw, attn_implementation=cfg.attn_implementation)
    except Exception as e:  # transformers' own validation (its error classes vary by version), as one line
        why = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise ConfigError(f"{path}: transformers rejects this LlamaConfig ({why[-1]}); fix the model config") from None
    heads, kv = hf.num_attention_heads, hf.num_key_value_heads
    if heads <= 0 or hf.hidden_size % heads:
        raise ConfigError(f"{path}: hidden_size={hf.hidden_size} is not a multiple of num_attention_heads={heads}; "
                          f"fix the model config")
    if kv is None or kv <= 0 or heads % kv:
        raise ConfigError(f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; "
                          f"fix the model config")
    if seq_len is not None and seq_len > hf.max_position_embeddings:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings="
                          f"{hf.max_position_embeddings} ({path.name}); lower data.seq_len")
    return hf


def build_model(hf_config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised LLaMA (normal(0, initializer_range) weights), identical for a seed.

    The seed is set here, not by the caller, so every rank and every resumed run starts from the
    same initial weights without depending on what consumed the global RNG before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    return model


def config_fingerprint(hf_config: LlamaConfig) -> str:
    """A short hash of the architecture, stored in checkpoints to refuse resuming another model."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "num_hidden_layers", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "rope_theta")
    d = {k: getattr(hf_config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def count_params(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n)
    return {"total": total, "non_embedding": total - embed}


def flops_per_token(hf_config: LlamaConfig, n_params_non_embedding: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention scores.

    N excludes the input embedding (a lookup, no FLOPs) but includes the LM head. The attention
    term 12 * layers * hidden * seq_len is the PaLM / nanoGPT estimate (QK^T and AV, fwd+bwd).
    """
    attn = 12 * hf_config.num_hidden_layers * hf_config.hidden_size * seq_len
    return 6.0 * n_params_non_embedding + attn


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy. logits: (B, T, V), targets: (B, T), already shifted by the sampler.

    Computed in float32 even under bf16 autocast: the log-softmax over a 32k vocabulary is where
    bf16 rounding hurts most.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


def transformer_blocks(model: LlamaForCausalLM) -> list[torch.nn.Module]:
    """The decoder layers, the unit that FSDP2 shards and that per-block β groups follow."""
    return list(model.model.layers)
