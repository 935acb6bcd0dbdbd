"""Memory of a training step: activation checkpointing and the chunked cross-entropy, measured on CPU, and
an estimate for any model and batch (e.g. LLaMA-1B at the paper's batch per GPU).

    python -m tools.bench_memory                       # LLaMA-60M, 8 x 256 tokens, fp32, CPU (~1 min)
    python -m tools.bench_memory --estimate llama_1b --gpus 8 --dtype bf16

How it measures (torch's CPU allocator keeps no statistics):
* saved activations: the bytes autograd keeps for the backward, counted with
  torch.autograd.graph.saved_tensors_hooks during the forward (each storage once, parameters excluded).
  This is what activation checkpointing cuts (a checkpointed block keeps only its input);
* step peak: the resident-set high-water mark (ru_maxrss) of a fresh process over one forward + backward,
  minus its resident set just before, with glibc told to mmap every allocation >= 64 KiB
  (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the resident set at once. It includes the transient
  tensors no hook sees: the (B, T, V) logits, their fp32 copy and their gradient, which the chunked
  cross-entropy removes;
* estimate: the same saved-tensor count on the meta device (shapes and dtypes, no memory, no compute), so
  it holds for any model, batch and dtype; it is checked against the measured 60M figure (same code path,
  real tensors) before it prints the 1B table. Model state per GPU adds 4 + 4 + 8 bytes per parameter
  (fp32 weights, gradients, the two AM-AdamW moments), divided by the GPUs for FSDP2 / ZeRO-3, plus the
  loss-path transient (logits per micro-batch, or per chunk).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from amllm.config import ModelConfig
from amllm.model import build_model, load_llama_config
from amllm.parallel.blocks import apply_ac

VARIANTS = {"plain": ("none", 0), "ac": ("full", 0), "chunked_ce": ("none", 1024), "both": ("full", 1024)}
MB = 2 ** 20


def saved_activation_bytes(model, x, y) -> int:
    """Bytes autograd keeps for the backward of one training forward (each storage once, no parameters)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params and st._cdata not in seen:
            seen.add(st._cdata)
            total[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, targets=y)
    del loss
    return total[0]


def make(model_name: str, variant: str, device: str = "cpu", dtype=torch.float32):
    ac, chunk = VARIANTS[variant]
    cfg = load_llama_config(ModelConfig(name=model_name), vocab_size=32000)
    with torch.device(device):
        model = build_model(cfg, loss_chunk=chunk).to(dtype)
    apply_ac(model, ac)
    return model.train(), cfg


def batch(batch_size: int, seq: int, device: str = "cpu"):
    x = torch.randint(0, 32000, (batch_size, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    return x[:, :-1], x[:, 1:]


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(model_name: str, variant: str, batch_size: int, seq: int) -> dict:
    """In this (fresh) process: saved bytes, then the RSS peak of one forward + backward."""
    model, _ = make(model_name, variant)
    x, y = batch(batch_size, seq)
    saved = saved_activation_bytes(model, x, y)
    model(input_ids=x, targets=y).backward()  # warm-up: gradients allocated, allocator and threads settled
    before = _rss()
    model(input_ids=x, targets=y).backward()  # grads accumulate in place: no new gradient memory
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "saved": saved, "peak": peak - before}


def measure(model_name: str, batch_size: int, seq: int) -> list[dict]:
    """Each variant in a fresh process (a clean high-water mark), one after another."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = []
    for v in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--one", v, "--model", model_name, "--batch", str(batch_size),
                            "--seq", str(seq)], env=env, capture_output=True, text=True, check=True)
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


class _FlashSaves(torch.autograd.Function):
    """On meta, SDPA runs its math path, which saves the (T, T) attention matrix; the fused kernels it uses
    on CPU and GPU (flash, memory-efficient) save q, k, v, the output and a per-row logsumexp. This
    stand-in saves exactly those (no values: meta)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FusedAttentionOnMeta(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _FlashSaves.apply(*args[:3])
        return func(*args, **(kwargs or {}))


def estimate_saved(model_name: str, variant: str, batch_size: int, seq: int, dtype=torch.float32) -> int:
    """Saved-activation bytes of one micro-batch, traced on the meta device (no memory used), with the
    attention saves of the fused SDPA kernels."""
    model, _ = make(model_name, variant, device="meta", dtype=dtype)
    x, y = batch(batch_size, seq, device="meta")
    with _FusedAttentionOnMeta():
        return saved_activation_bytes(model, x, y)


def logits_bytes(tokens: int, vocab: int = 32000, chunk: int = 0) -> int:
    """The loss path's transient at its peak: the plain path holds the (tokens, V) fp32 logits (or, under bf16,
    their bf16 output and fp32 copy ~ 6 bytes) and their gradient; the chunked one a (chunk, V) fp32 block."""
    return (min(chunk, tokens) if chunk else 2 * tokens) * vocab * 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_60m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--estimate", default="llama_1b", help="model for the per-GPU estimate")
    p.add_argument("--global-batch", type=int, default=1024, help="the paper's: 1024 sequences")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="activation dtype of the estimate")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure_one(a.model, a.one, a.batch, a.seq)))
        return

    tokens = a.batch * a.seq
    res = {r["variant"]: r for r in measure(a.model, a.batch, a.seq)}
    full_logits = tokens * 32000 * 4
    print(f"{a.model}, {a.batch} x {a.seq} tokens, fp32, CPU, one forward + backward (fresh process each):")
    print(f"{'variant':12s} {'saved activations MB':>21s} {'step peak MB':>13s}")
    for v, r in res.items():
        print(f"{v:12s} {r['saved'] / MB:21.1f} {r['peak'] / MB:13.1f}")
    ac_cut = 1 - res["ac"]["saved"] / res["plain"]["saved"]
    ac_cut_both = 1 - res["both"]["saved"] / res["chunked_ce"]["saved"]
    ce_removed = (res["plain"]["peak"] - res["chunked_ce"]["peak"]) / full_logits
    print(f"activation checkpointing: saved activations -{100 * ac_cut:.0f}% (with chunked CE: -{100 * ac_cut_both:.0f}%)"
          f"  [target >= 50%: {'met' if min(ac_cut, ac_cut_both) >= 0.5 else 'NOT met'}]")
    print(f"chunked CE: step peak -{(res['plain']['peak'] - res['chunked_ce']['peak']) / MB:.0f} MB = {100 * ce_removed:.0f}% "
          f"of the logits' fp32 copy ({full_logits / MB:.0f} MB)  [target >= 90%: {'met' if ce_removed >= 0.9 else 'NOT met'}]")

    # the estimate, checked on the measured model first
    check = {v: estimate_saved(a.model, v, a.batch, a.seq) for v in VARIANTS}
    worst = max(abs(check[v] - res[v]["saved"]) / res[v]["saved"] for v in VARIANTS)
    print(f"meta-device estimate of {a.model}'s saved activations vs measured: worst {100 * worst:.2f}% off "
          f"[{'ok' if worst < 0.05 else 'CHECK THE ESTIMATE'}]")

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cfg = load_llama_config(ModelConfig(name=a.estimate), vocab_size=32000)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(cfg).parameters())
    per_gpu = a.global_batch // a.gpus
    state = 16 * n_params
    print(f"\n{a.estimate} ({n_params / 1e6:.0f}M parameters), global batch {a.global_batch} x {a.seq} on {a.gpus} GPUs "
          f"= {per_gpu} sequences per GPU per step, {a.dtype} activations (weights cast to {a.dtype}; autocast keeps "
          f"the residual stream fp32, a little more); GB per GPU, {a.gpu_gb:.0f} GB GPUs:")
    print(f"model state: DDP {state / 1e9:.1f} GB, FSDP2/ZeRO-3 {state / a.gpus / 1e9:.1f} GB")
    print(f"{'micro-batch':>11s} {'accum':>5s} | " + " | ".join(f"{v:>10s}" for v in VARIANTS) + "   (activations + loss transient; + state)")
    for mb in (4, 8, 16, 32, 64, 128):
        if mb > per_gpu or per_gpu % mb:
            continue
        row = []
        for v, (_, chunk) in VARIANTS.items():
            act = estimate_saved(a.estimate, v, mb, a.seq, dtype) + logits_bytes(mb * a.seq, chunk=chunk)
            total_ddp = act + state
            fits = "" if total_ddp / 1e9 <= a.gpu_gb else ("*" if (act + state / a.gpus) / 1e9 <= a.gpu_gb else "!")
            row.append(f"{act / 1e9:9.1f}{fits or ' '}")
        print(f"{mb:11d} {per_gpu // mb:5d} | " + " | ".join(row))
    print("  (* fits only sharded: FSDP2 / ZeRO-3; ! does not fit even sharded)")


if __name__ == "__main__":
    main()
