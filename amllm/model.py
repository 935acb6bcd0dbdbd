"""LLaMA models from `configs/models/*.json`, built with transformers' `LlamaForCausalLM`.

The JSON files carry the paper's Table E.3 shapes (20M .. 1B) in Hugging Face `LlamaConfig`
keys, so a trained model exports to the HF format unchanged (tools/export_hf.py). The model
knows nothing about distribution: `amllm/parallel/` wraps it (DDP, FSDP2, DeepSpeed).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import types
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
    attn = cfg.attn_implementation
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA "
                              "GPU (pip install flash-attn); use sdpa (it runs FlashAttention-2 kernels where it can)")
    try:
        hf = LlamaConfig(**raw, attn_implementation="sdpa" if attn.startswith("sdpa_") else attn)
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


# The attention every LlamaLM uses for model.attn_implementation=sdpa(_*): transformers' own SDPA function,
# registered under a name of ours WITHOUT a mask function. transformers then builds no mask (None) and SDPA
# applies causality itself (is_causal=True, which also selects its flash kernels). That is exact here: the
# sampler's windows are full (no padding) and documents inside a window attend across EOS, as in GPT/LLaMA
# pretraining. It spares transformers' mask code, which, without a KV cache, checks the position ids for
# packed sequences with a host read of a device value every forward.
CAUSAL_SDPA = "amllm_causal_sdpa"


def _register_causal_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


_register_causal_sdpa()


def training_config(hf_config: LlamaConfig) -> LlamaConfig:
    """The configuration a LlamaLM runs with: ``hf_config`` (left untouched: tools/export_hf.py saves it)
    with no KV cache and, for SDPA, :data:`CAUSAL_SDPA`.

    No KV cache anywhere, in training and in evaluation: a pretraining forward sees each window once. Set
    here, on the config, it holds whatever the transformers release calls the layers' cache argument
    (``cache`` in 5.25, ``past_key_values`` in 5.17). With a cache, every block called ``cache.update(...,
    layer_idx)``, and a compiled block specialised on its layer index: one graph per block, and Dynamo's
    recompile limit (8) hit at the first evaluation of any model with 8 or more blocks.
    """
    cfg = copy.deepcopy(hf_config)
    cfg.use_cache = False
    if cfg._attn_implementation == "sdpa":
        cfg._attn_implementation = CAUSAL_SDPA
    return cfg


def drop_hub_kernel_routing(model: torch.nn.Module) -> int:
    """Call transformers' own forward on modules that the ``kernels`` package wrapped; returns how many.

    transformers >= 5.2x decorates LlamaAttention with ``kernels.use_kernelized_func``, whose forward sets a
    context variable around every call so that hub kernels (``kernelize``, which we never call) could be routed
    to. Inside a compiled, checkpointed block that assignment is a side effect Dynamo refuses ("HOP: Unsafe side
    effect ... CompileableContextVar"). The wrapper is recognised by the module its code lives in (``kernels``)
    and bypassed per instance; without the package (transformers 5.17) there is nothing to do.
    """
    n = 0
    for module in model.modules():
        forward = type(module).forward
        home = getattr(forward, "__globals__", {}).get("__name__", "")
        if home.split(".")[0] == "kernels" and hasattr(forward, "__wrapped__"):
            module.forward = types.MethodType(forward.__wrapped__, module)
            n += 1
    return n


class LlamaLM(LlamaForCausalLM):
    """transformers' LlamaForCausalLM, plus a training forward that returns the loss itself.

    ``model(input_ids=x)`` is LlamaForCausalLM's forward (``.logits``, generation, HF export).
    ``model(input_ids=x, targets=y)`` runs the decoder (``self.model``: embeddings, blocks, final
    norm) and returns the next-token cross entropy of ``lm_head(hidden)`` without the whole batch's
    logits when ``loss_chunk`` > 0 (see :func:`chunked_lm_loss`). The loss is computed inside
    ``forward`` so that DDP, FSDP2's root hooks (which gather the lm head) and the DeepSpeed engine
    all see one ordinary forward call. Parameter names are LlamaForCausalLM's. It runs with
    :func:`training_config` (no KV cache, causal SDPA) and without the hub-kernel routing wrapper
    (:func:`drop_hub_kernel_routing`), so its blocks compile to one graph in training and evaluation.
    """

    loss_chunk: int = 0  # tokens per chunk of the loss; 0: the whole batch's logits (lm_loss)
    sdpa_backend = None  # a torch.nn.attention.SDPBackend every forward is restricted to (model.attn_implementation=sdpa_*)

    def __init__(self, config: LlamaConfig):
        super().__init__(training_config(config))  # no KV cache; causal SDPA without a mask
        drop_hub_kernel_routing(self)

    def forward(self, input_ids=None, targets=None, reduction: str = "mean", **kwargs):
        if self.sdpa_backend is not None:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(self.sdpa_backend):
                return self._forward(input_ids, targets, reduction, **kwargs)
        return self._forward(input_ids, targets, reduction, **kwargs)

    def _forward(self, input_ids, targets, reduction, **kwargs):
        if targets is None:
            return super().forward(input_ids=input_ids, **kwargs)
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state  # (B, T, H), after the final norm
        if self.loss_chunk <= 0:
            return lm_loss(self.lm_head(hidden), targets, reduction)
        return chunked_lm_loss(hidden, self.lm_head.weight, targets, self.loss_chunk, reduction)


SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}


def build_model(hf_config: LlamaConfig, seed: int = 0, loss_chunk: int = 0, attention: str | None = None) -> LlamaLM:
    """A freshly initialised LLaMA (normal(0, initializer_range) weights), identical for a seed.

    The seed is set here, not by the caller, so every rank and every resumed run starts from the
    same initial weights without depending on what consumed the global RNG before.
    ``loss_chunk``: tokens per chunk of the training loss (train.loss_chunk; 0: whole-batch logits).
    ``attention``: model.attn_implementation; an ``sdpa_*`` value restricts SDPA to that kernel.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaLM(hf_config)
    model.loss_chunk = int(loss_chunk)
    if attention in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend

        model.sdpa_backend = getattr(SDPBackend, SDPA_BACKENDS[attention])
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


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``t`` runs in here: autocast's (bf16 under train.precision=bf16) or its own."""
    dev = t.device.type
    on = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)  # (not on "meta": tools/bench_memory.py)
    return torch.get_autocast_dtype(dev) if on else t.dtype


def _chunked_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                grad_h: torch.Tensor | None = None, grad_w: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of CE(h @ weight.T, targets), ``chunk`` rows at a time; when ``grad_h`` / ``grad_w``
    are given, also d(sum)/dh into ``grad_h`` and d(sum)/dweight added to ``grad_w`` (fp32).

    h: (N, H), weight: (V, H), targets: (N,). The matmuls run in the autocast dtype (as lm_head does
    under autocast); each chunk's logits are upcast to fp32 for the log-softmax, as :func:`lm_loss`
    does for the whole batch -- only one chunk's (chunk, V) fp32 logits exist at a time.
    """
    mm = _matmul_dtype(weight)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    no_autocast = torch.autocast(h.device.type, enabled=False) if torch.amp.is_autocast_available(h.device.type) \
        else contextlib.nullcontext()
    with no_autocast:
        w = weight.to(mm)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk].to(mm), targets[s:s + chunk]
            logits = (hc @ w.t()).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if grad_h is None and grad_w is None:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0  # d CE / d logits = softmax - onehot
            g = g.to(mm)
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ w
            if grad_w is not None:
                if mm == grad_w.dtype:
                    grad_w.addmm_(g.t(), hc)
                else:  # bf16 matmul per chunk, summed over chunks in fp32
                    grad_w += g.t() @ hc
    return total


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum CE(h @ W.T, y) whose gradients are computed chunk by chunk in the forward (no recompute,
    no (N, V) tensor) and kept for the backward, which only scales them by the incoming gradient.
    Costs dL/dh (N, H) and an fp32 dL/dW (V, H) held from forward to backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        total = _chunked_ce(h, weight, targets, chunk, grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                    reduction: str = "mean") -> torch.Tensor:
    """:func:`lm_loss` of ``hidden @ weight.T`` without materialising the (B, T, V) logits.

    hidden: (B, T, H) final-norm output; weight: the lm head (V, H); targets: (B, T), all valid
    (the sampler never pads). The logits exist ``chunk`` tokens at a time (fp32 for the softmax);
    the same loss and gradients as ``lm_loss(lm_head(hidden), targets)`` up to float summation order
    (tests/test_perf.py). Saves per micro-batch, vs. that path: the fp32 copy of the logits, their
    gradient and the lm head's (B, T, V) output.
    """
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total = _ChunkedLinearCrossEntropy.apply(h, weight, y, int(chunk))
    else:  # evaluation: no gradients to build
        total = _chunked_ce(h, weight, y, int(chunk))
    return total / y.numel() if reduction == "mean" else total

