"""Optimizer step time on LLaMA-shaped parameters: torch AdamW / SGD vs AM-AdamW / AM-SGD.

    python -m tools.bench_optimizer                 # CPU, LLaMA-20M shapes
    python -m tools.bench_optimizer --device cuda   # GPU
    python -m tools.bench_optimizer --shapes 1b --only "AdamW foreach,triton"   # the accelerator path's dispatch
    python -m tools.bench_optimizer --device cuda --shapes 1b --dtype bfloat16 --only "AdamW fused,triton"

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
the multi-tensor Triton kernels (``_triton.py``); "compiled (Inductor)" forces the
per-tensor torch.compile'd kernels, "triton" the Triton kernels (on CPU under Triton's
interpreter, ``TRITON_INTERPRET=1``, set here).

Dispatch figures (the accelerator path's cost on the host, what issue #10 is about): per
step, the Triton launches, the torch.compile'd calls, the aten ops dispatched (counted with
a ``TorchDispatchMode``) and the host time. ``--shapes 1b`` has LLaMA-1B's tensor count
(configs/models: 24 layers, untied embeddings: 219 tensors); on CPU its dimensions are
divided by 128 so that the measurement is of dispatch, not arithmetic. On CPU the
interpreter runs the kernel bodies in numpy, so the triton variants' host time is measured
with the launches stubbed out ("kernels stubbed": everything else of the step runs: tables,
torch ops, Python), against torch's foreach AdamW on the same tensors; on CUDA the host
time is the wall time of the ``step()`` calls without synchronising (the kernels run
asynchronously), next to the synchronised ms/step. Finally the dispatched ops of a step at N
and at 4N tensors (the layer stack repeated 4x): the ratio should stay near 1.

Extra memory: on CUDA the peak allocated during one step above the state; on CPU
(torch's allocator is not instrumented) the bytes of the temporaries each path creates,
from the code: foreach AM-AdamW keeps p, d/p, δ, wδ and p(1+λp) alive (5 tensors per
parameter tensor); the fused paths only a few sums per tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amllm.optim import AMSGD, AMAdamW, _compiled, _triton


def llama20m_shapes(vocab=32000, hidden=256, inter=688, layers=4):
    shapes = [(vocab, hidden)]  # embed_tokens
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4  # q, k, v, o
        shapes += [(inter, hidden), (inter, hidden), (hidden, inter)]  # gate, up, down
        shapes += [(hidden,), (hidden,)]  # input / post-attention RMSNorm
    shapes += [(hidden,), (vocab, hidden)]  # final norm, lm_head
    return shapes


def llama1b_shapes(scale=1, repeat=1):
    """LLaMA-1B (configs/models: hidden 2048, intermediate 5461, 24 layers, vocab 32000, untied):
    219 tensors; ``scale`` divides the dimensions, ``repeat`` multiplies the layer count."""
    return llama20m_shapes(vocab=32000 // scale, hidden=2048 // scale, inter=5461 // scale, layers=24 * repeat)


class OpCount(TorchDispatchMode):
    """Aten ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def stub_kernels():
    """Triton launches counted but not run (CPU: the interpreter's numpy body is not host overhead)."""
    real = _triton._launch

    def launch(name, grid, device, *args, **meta):
        _triton.launches += 1

    _triton._launch = launch
    try:
        yield
    finally:
        _triton._launch = real


_compiled_calls = [0]


def count_compiled_calls():
    """Wrap the torch.compile'd functions so that their calls are counted."""
    real = _compiled.compiled

    def compiled(name):
        fn = real(name)

        def counted(*a, **k):
            _compiled_calls[0] += 1
            return fn(*a, **k)
        return counted

    _compiled.compiled = compiled


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
    ap.add_argument("--shapes", default="20m", choices=["20m", "1b"],
                    help="LLaMA-20M (39 tensors) or LLaMA-1B (219 tensors; dimensions / 128 on CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton variants: Triton's interpreter
    count_compiled_calls()
    scale = 128 if (args.shapes == "1b" and device.type == "cpu") else 1
    shapes_of = (lambda repeat=1: llama20m_shapes(layers=4 * repeat)) if args.shapes == "20m" else \
        (lambda repeat=1: llama1b_shapes(scale, repeat))
    shapes = shapes_of()
    kw = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    sgd_kw = dict(lr=1e-2, weight_decay=1e-4)

    def forced(opt, impl):
        opt.impl = impl  # the kernel path by name (the optimizer's IMPLS)
        return opt

    variants = {
        "AdamW for-loop": lambda p: torch.optim.AdamW(p, foreach=False, **kw),
        "AdamW foreach": lambda p: torch.optim.AdamW(p, foreach=True, **kw),
        "AdamW fused": lambda p: torch.optim.AdamW(p, fused=True, **kw),
        "AMAdamW default (auto)": lambda p: AMAdamW(p, lam=0.1, **kw),
        "AMAdamW foreach": lambda p: AMAdamW(p, lam=0.1, foreach=True, **kw),
        "AMAdamW fused": lambda p: AMAdamW(p, lam=0.1, fused=True, **kw),
        "AMAdamW compiled (Inductor)": lambda p: forced(AMAdamW(p, lam=0.1, fused=True, **kw), "compiled"),
        "AMAdamW triton": lambda p: forced(AMAdamW(p, lam=0.1, fused=True, **kw), "triton"),
        "AMAdamW triton per-layer": lambda p: forced(AMAdamW(p, lam=0.1, fused=True, per_layer=True, **kw),
                                                     "triton"),
        "SGD momentum foreach": lambda p: torch.optim.SGD(p, momentum=0.9, foreach=True, **sgd_kw),
        "SGD momentum fused": lambda p: torch.optim.SGD(p, momentum=0.9, fused=True, **sgd_kw),
        "AMSGD foreach": lambda p: AMSGD(p, foreach=True, **sgd_kw),
        "AMSGD fused": lambda p: AMSGD(p, fused=True, **sgd_kw),
        "AMSGD triton": lambda p: forced(AMSGD(p, fused=True, **sgd_kw), "triton"),
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

    def ctx(name):
        """The kernels of the triton variants are stubbed on CPU (see the module docstring)."""
        return stub_kernels() if ("triton" in name and device.type == "cpu") else contextlib.nullcontext()

    first, peak = {}, {}
    dispatch = {}
    for name, opt in opts.items():  # warm-up (state allocation, compilation, first-step paths)
        sync()
        t0 = time.perf_counter()
        opt.step()  # the real kernels once (CPU: interpreted), so the state is as in a run
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
        with ctx(name):
            launches, compiled_calls = _triton.launches, _compiled_calls[0]
            with OpCount() as ops:
                opt.step()
            dispatch[name] = (_triton.launches - launches, _compiled_calls[0] - compiled_calls, ops.n)
        if device.type == "cuda" and ("triton" in name or name == "AMAdamW fused"):
            torch.cuda.set_sync_debug_mode("error")  # any host sync in a step raises
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    sync()
    times = {name: [] for name in opts}
    host = {name: [] for name in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            with ctx(name):
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    opt.step()
                t1 = time.perf_counter()
                sync()
                times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
                host[name].append((t1 - t0) / args.steps * 1e3)

    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} shapes={args.shapes}"
          f"{f' (dims / {scale})' if scale > 1 else ''} params={n_params / 1e6:.2f}M tensors={len(shapes)} "
          f"rounds={args.rounds}x{args.steps}")
    ms = {name: statistics.median(t) for name, t in times.items()}
    host_ms = {name: statistics.median(t) for name, t in host.items()}
    for name, m in ms.items():
        extra = f"   extra {peak[name] / 2**20:.0f} MiB" if name in peak else ""
        stub = " [kernels stubbed]" if "triton" in name and device.type == "cpu" else ""
        print(f"  {name:36s} {m:8.2f} ms/step   (min {min(times[name]):.2f}; first step {first[name]:.1f} s){extra}"
              f"{stub}")
    print("  per step: triton launches / compiled calls / dispatched aten ops / host ms")
    for name, (launches, calls, n_ops) in dispatch.items():
        print(f"  {name:36s} {launches:4d} / {calls:4d} / {n_ops:6d} / {host_ms[name]:8.3f}")
    for am in [n for n in opts if "triton" in n]:
        for base in ("AdamW foreach", "AdamW fused"):
            if base in host_ms:
                print(f"  host-time ratio {am} / {base}: {host_ms[am] / host_ms[base]:.2f}")
    for am, base in (("AMAdamW default (auto)", "AdamW foreach"), ("AMAdamW fused", "AdamW fused"),
                     ("AMAdamW compiled (Inductor)", "AdamW fused"), ("AMAdamW foreach", "AdamW foreach"),
                     ("AMSGD fused", "SGD momentum fused"), ("AMSGD foreach", "SGD momentum foreach")):
        if am in ms and base in ms:
            print(f"  ratio {am} / {base}: {ms[am] / ms[base]:.2f}")
    for name in ("AdamW foreach", "AMAdamW default (auto)", "AMAdamW fused", "SGD momentum foreach", "AMSGD fused"):
        if name in opts:
            print(f"  state bytes {name:28s} {state_bytes(opts[name]):,}")
    # dispatched ops at N and 4N tensors: the counts do not depend on sizes, so small
    # dimensions (4x LLaMA-1B's tensors at full size would not fit next to the variants)
    small_of = (lambda repeat: llama20m_shapes(vocab=1000, hidden=32, inter=86, layers=4 * repeat)) \
        if args.shapes == "20m" else (lambda repeat: llama1b_shapes(128, repeat))
    ops_at = {}
    for name in [n for n in opts if "triton" in n]:
        for repeat in (1, 4):
            opt = variants[name](make_params(small_of(repeat), device, dtype))
            with ctx(name):
                opt.step()
                opt.step()
                with OpCount() as ops:
                    opt.step()
            ops_at[name, repeat] = (len(opt.param_groups[0]["params"]), ops.n)
            del opt
        (n1, o1), (n4, o4) = ops_at[name, 1], ops_at[name, 4]
        print(f"  dispatched ops {name}: {o1} at {n1} tensors, {o4} at {n4}: ratio {o4 / o1:.2f} (target <= 1.5)")
    if device.type != "cuda":
        n_bytes = n_params * torch.empty((), dtype=dtype).element_size()
        print(f"  temporaries (from the code): AMAdamW foreach ~{5 * n_bytes / 2**20:.0f} MiB per step "
              f"(5 x params); fused: 5 sums per tensor (C++: 5 float64 per 16k-element chunk, "
              f"{5 * 8 * sum(-(-torch.Size(s).numel() // (1 << 14)) for s in shapes) / 2**10:.0f} KiB)")


if __name__ == "__main__":
    main()
