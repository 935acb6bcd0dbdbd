"""Optimizer step time on LLaMA-20M-shaped parameters: torch AdamW / SGD vs AM-AdamW / AM-SGD.

    python tools/bench_optimizer.py                 # CPU
    python tools/bench_optimizer.py --device cuda   # GPU

Parameters are built by hand with the shapes of transformers' LlamaForCausalLM for the
20M config (vocab 32000, hidden 256, intermediate 688, 4 layers, untied embed/lm_head,
RMSNorm weights): 19.5M parameters in 39 tensors. Gradients are random and fixed.
Every variant has its own copy of params/grads/state; measurements are interleaved
round-robin after a warm-up, and the median over rounds is reported, so one run gives
fair ratios even on a shared machine. The first step of each variant is timed
separately and excluded (for the fused paths it includes loading the C++ kernels, or
torch.compile: set TORCHINDUCTOR_CACHE_DIR / TORCH_EXTENSIONS_DIR to fresh folders to
see a cold compile / build).

"fused" is what ``fused=True`` runs: on CPU the C++ kernels (csrc/am_cpu.cpp), on CUDA
the torch.compile'd kernels; "compiled (Inductor)" forces the latter on CPU too.

Extra memory: on CUDA the peak allocated during one step above the state; on CPU
(torch's allocator is not instrumented) the bytes of the temporaries each path creates,
from the code: foreach AM-AdamW keeps p, d/p, δ, wδ and p(1+λp) alive (5 tensors per
parameter tensor); the fused paths only a few sums per tensor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from amllm.optim import AMSGD, AMAdamW  # noqa: E402


def llama20m_shapes(vocab=32000, hidden=256, inter=688, layers=4):
    shapes = [(vocab, hidden)]  # embed_tokens
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4  # q, k, v, o
        shapes += [(inter, hidden), (inter, hidden), (hidden, inter)]  # gate, up, down
        shapes += [(hidden,), (hidden,)]  # input / post-attention RMSNorm
    shapes += [(hidden,), (vocab, hidden)]  # final norm, lm_head
    return shapes


def make_params(shapes, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((0.02 * torch.randn(s, generator=g)).to(device, dtype))
        p.grad = (1e-3 * torch.randn(s, generator=g)).to(device, dtype)
        params.append(p)
    return params


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    if hasattr(opt, "beta_state"):
        total += sum(v.numel() * v.element_size() for v in opt.beta_state.to_dict().values())
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--skip-reference", action="store_true", help="skip the slow for-loop AM-AdamW")
    ap.add_argument("--only", default="", help="comma-separated substrings of the variant names to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = llama20m_shapes()
    kw = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    sgd_kw = dict(lr=1e-2, weight_decay=1e-4)

    def forced(opt, impl):
        opt._impl = impl  # the kernel path by name (functional.IMPLS), as the tests do
        return opt

    variants = {
        "AdamW for-loop": lambda p: torch.optim.AdamW(p, foreach=False, **kw),
        "AdamW foreach": lambda p: torch.optim.AdamW(p, foreach=True, **kw),
        "AdamW fused": lambda p: torch.optim.AdamW(p, fused=True, **kw),
        "AMAdamW default (auto)": lambda p: AMAdamW(p, lam=0.1, **kw),
        "AMAdamW foreach": lambda p: AMAdamW(p, lam=0.1, foreach=True, **kw),
        "AMAdamW fused": lambda p: AMAdamW(p, lam=0.1, fused=True, **kw),
        "AMAdamW compiled (Inductor)": lambda p: forced(AMAdamW(p, lam=0.1, fused=True, **kw), "compiled"),
        "SGD momentum foreach": lambda p: torch.optim.SGD(p, momentum=0.9, foreach=True, **sgd_kw),
        "SGD momentum fused": lambda p: torch.optim.SGD(p, momentum=0.9, fused=True, **sgd_kw),
        "AMSGD foreach": lambda p: AMSGD(p, foreach=True, **sgd_kw),
        "AMSGD fused": lambda p: AMSGD(p, fused=True, **sgd_kw),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if any(w.lower() in k.lower() for w in args.only.split(","))}
    opts = {}
    for name, make in variants.items():
        try:
            opts[name] = make(make_params(shapes, device, dtype))
        except (RuntimeError, ValueError) as e:  # e.g. fused unsupported for a dtype/device
            print(f"skip {name}: {e}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    first, peak = {}, {}
    for name, opt in opts.items():  # warm-up (state allocation, compilation, first-step paths)
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        first[name] = time.perf_counter() - t0
        opt.step()
        if device.type == "cuda":
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            sync()
            peak[name] = torch.cuda.max_memory_allocated() - base
    sync()
    times = {name: [] for name in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)

    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"params={n_params / 1e6:.2f}M tensors={len(shapes)} rounds={args.rounds}x{args.steps}")
    ms = {name: statistics.median(t) for name, t in times.items()}
    for name, m in ms.items():
        extra = f"   extra {peak[name] / 2**20:.0f} MiB" if name in peak else ""
        print(f"  {name:36s} {m:8.2f} ms/step   (min {min(times[name]):.2f}; first step {first[name]:.1f} s){extra}")
    for am, base in (("AMAdamW default (auto)", "AdamW foreach"), ("AMAdamW fused", "AdamW fused"),
                     ("AMAdamW compiled (Inductor)", "AdamW fused"), ("AMAdamW foreach", "AdamW foreach"),
                     ("AMSGD fused", "SGD momentum fused"), ("AMSGD foreach", "SGD momentum foreach")):
        if am in ms and base in ms:
            print(f"  ratio {am} / {base}: {ms[am] / ms[base]:.2f}")
    for name in ("AdamW foreach", "AMAdamW default (auto)", "AMAdamW fused", "SGD momentum foreach", "AMSGD fused"):
        if name in opts:
            print(f"  state bytes {name:28s} {state_bytes(opts[name]):,}")
    if device.type != "cuda":
        n_bytes = n_params * torch.empty((), dtype=dtype).element_size()
        print(f"  temporaries (from the code): AMAdamW foreach ~{5 * n_bytes / 2**20:.0f} MiB per step "
              f"(5 x params); fused: 5 sums per tensor (C++: 5 float64 per 16k-element chunk, "
              f"{5 * 8 * sum(-(-torch.Size(s).numel() // (1 << 14)) for s in shapes) / 2**10:.0f} KiB)")


if __name__ == "__main__":
    main()
