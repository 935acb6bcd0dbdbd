#!/usr/bin/env python
"""Per-iteration time of AdamW vs AM-AdamW on the real LLaMA models (the paper's Table D.4, here).

    python -m tools.bench_overhead                                  # LLaMA-20M, 8 x 256, fp32, CPU
    python -m tools.bench_overhead --models llama_20m llama_60m --iters 4 --rounds 3

A timed iteration is a full training step on one fixed batch: forward, loss, backward, global-norm
clip, optimizer step, zero_grad, and a host sync (loss.item()). Each model is built once per
optimizer from the same seed; the two optimizers then run in interleaved rounds (AdamW, AM-AdamW,
AdamW, ...) so machine noise hits both alike. The first `--warmup` iterations of each round are
dropped; the figure is the median of the rest. Prints a Markdown table: wall time per iteration for
each optimizer and AM-AdamW's overhead in percent, and the same in CPU time of this process (all
threads), which other jobs on a shared machine disturb much less than wall time. The vocabulary is 32000 (the paper's tokenizer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


from amllm.config import ModelConfig, OptimConfig
from amllm.model import build_model, count_params, lm_loss, load_llama_config
from amllm.optim_factory import build_optimizer

OPTIMS = ("adamw", "am_adamw")


def iterate(model, opt, params, x, n: int) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds of this process) per iteration."""
    times = []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        loss = lm_loss(model(input_ids=x[:, :-1]).logits, x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t, time.process_time() - c))
    return times


def bench(model_name: str, batch: int, seq: int, iters: int, warmup: int, rounds: int, device: torch.device,
          impl: str) -> dict:
    cfg = load_llama_config(ModelConfig(name=model_name), vocab_size=32000)
    x = torch.randint(0, 32000, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    setups = {}
    for name in OPTIMS:
        model = build_model(cfg, seed=0).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        setups[name] = (model, build_optimizer(OptimConfig(name=name, impl=impl), params, device), params)
    n_params = count_params(setups["adamw"][0])["total"]
    times = {name: [] for name in OPTIMS}
    for _ in range(rounds):
        for name in OPTIMS:
            times[name] += iterate(*setups[name], x, warmup + iters)[warmup:]
    wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    return {"model": model_name, "params": n_params, "wall": wall, "cpu": cpu,
            "overhead": 100 * (wall["am_adamw"] / wall["adamw"] - 1),
            "overhead_cpu": 100 * (cpu["am_adamw"] / cpu["adamw"] - 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama_20m"], help="configs/models names")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=4, help="timed iterations per optimizer per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations at the start of each round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--impl", default="auto", help="optim.impl for both optimizers")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"{device.type}, {torch.get_num_threads()} threads, fp32, batch {a.batch} x {a.seq}, vocab 32000, "
          f"optim.impl={a.impl}; median of {a.rounds * a.iters} iterations per optimizer "
          f"({a.rounds} interleaved rounds x {a.iters}, {a.warmup} warm-up dropped per round)\n")
    print("| model | params | AdamW s/iter | AM-AdamW s/iter | overhead | AdamW CPU-s/iter | AM-AdamW CPU-s/iter "
          "| overhead (CPU time) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for m in a.models:  # a row as soon as it is measured: the larger models take minutes on a CPU
        r = bench(m, a.batch, a.seq, a.iters, a.warmup, a.rounds, device, a.impl)
        w, c = r["wall"], r["cpu"]
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {w['adamw']:.3f} | {w['am_adamw']:.3f} | "
              f"{r['overhead']:+.1f}% | {c['adamw']:.3f} | {c['am_adamw']:.3f} | {r['overhead_cpu']:+.1f}% |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
