"""Collectives and speed of AM-AdamW vs torch AdamW under DeepSpeed ZeRO-2 and FSDP2 (2 ranks).

    python -m tools.bench_sharded                        # LLaMA-20M shapes, CPU/gloo, 2 ranks
    python -m tools.bench_sharded --model tiny --steps 3 # quick
    python -m tools.bench_sharded --device cuda          # 2 GPUs, NCCL

For every (backend, optimizer) it trains a LLaMA on random tokens and reports, per optimizer
step: the collectives issued (calls and elements of the first tensor argument, by op; counted
by wrapping the torch.distributed module functions -- DeepSpeed goes through them, FSDP2's
all-gather / reduce-scatter call ProcessGroup methods directly and are not seen; identical for
both optimizers either way), the time spent in the all-reduces the
optimizer issues inside its own step() (the β reduction) as a share of the step, and the
median step time. On CPU the optimizer's all-reduce also absorbs the ranks' skew (it waits for
the slower rank), so its share is an upper bound of the communication cost. Ratios AM / AdamW are printed at the end. Steps of the variants are
interleaved round-robin after a warm-up, so one run gives fair ratios on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict

import torch


SHAPES = {
    # configs/models/llama_20m.json (paper Table E.3)
    "llama_20m": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=4),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, num_hidden_layers=2),
}
OPS = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather", "reduce_scatter",
       "broadcast", "all_to_all_single")


class CommTrace:
    """Wraps torch.distributed collectives: counts (calls, elements) per op; times the all-reduces
    issued while ``in_optimizer`` is set (the optimizer's own reduction)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.orig = dist, {}
        self.counts = defaultdict(lambda: [0, 0])
        self.in_optimizer = False
        self.opt_reduce_s = 0.0
        self.opt_reduce_elems = []
        for op in OPS:
            if hasattr(dist, op):
                self.orig[op] = getattr(dist, op)
                setattr(dist, op, self._wrap(op, self.orig[op]))

    def _wrap(self, op, fn):
        def wrapped(*args, **kwargs):
            t = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)  # the first tensor
            n = t.numel() if t is not None else 0
            self.counts[op][0] += 1
            self.counts[op][1] += n
            if op == "all_reduce" and self.in_optimizer:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                self.opt_reduce_s += time.perf_counter() - t0
                self.opt_reduce_elems.append(n)
                return out
            return fn(*args, **kwargs)
        return wrapped

    def reset(self):
        self.counts.clear()
        self.opt_reduce_s, self.opt_reduce_elems = 0.0, []


def build(variant, args, world, device):
    """(step_fn, optimizer whose step() is the AM/AdamW step) for one backend x optimizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from amllm.optim import AMAdamW

    backend, optim = variant
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.model], max_position_embeddings=args.seq,
                                         tie_word_embeddings=False)).to(device)
    kw = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-4)
    if backend == "fsdp2":
        from amllm.parallel.fsdp import apply_fsdp2

        apply_fsdp2(model, "fp32")
    params = model.parameters()
    opt = (torch.optim.AdamW(params, foreach=True, **kw) if optim == "adamw"
           else AMAdamW(params, per_layer=(optim == "am_adamw_per_layer"), **kw))
    vocab = SHAPES[args.model]["vocab_size"]
    gen = torch.Generator().manual_seed(1)

    def batch():
        return torch.randint(0, vocab, (args.micro, args.seq), generator=gen).to(device)

    if backend == "zero2":
        from amllm.config import config_from_dict
        from amllm.parallel.deepspeed_backend import am_optimizer, build_engine

        cfg = config_from_dict({"train": {"batch_size": args.micro * world, "micro_batch_size": args.micro},
                                "optim": {"grad_clip": 1.0}})
        ds = {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}}
        engine = build_engine(model, opt, cfg, ds_config=ds)

        def step():
            ids = batch()
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        return step, (am_optimizer(engine) if optim != "adamw" else engine.basic_optimizer)

    def step():
        ids = batch()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, opt


def worker(rank, world, port, args, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), ".torch_extensions"))
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    trace = CommTrace()
    variants = [(b, o) for b in args.backends.split(",") for o in ("adamw", "am_adamw", "am_adamw_per_layer")]
    runs = {}
    for v in variants:
        step, opt = build(v, args, world, device)
        inner = opt.step

        def timed_step(*a, _inner=inner, **k):  # flag the optimizer's own collectives
            trace.in_optimizer = True
            try:
                return _inner(*a, **k)
            finally:
                trace.in_optimizer = False

        opt.step = timed_step
        for _ in range(args.warmup):
            step()
        runs[v] = dict(step=step, times=[], reduce_s=[], counts=None, opt_elems=None)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(args.steps):  # interleaved rounds
        for v, r in runs.items():
            sync()
            trace.reset()
            t0 = time.perf_counter()
            r["step"]()
            sync()
            r["times"].append(time.perf_counter() - t0)
            r["reduce_s"].append(trace.opt_reduce_s)
            r["counts"] = {k: tuple(c) for k, c in trace.counts.items()}
            r["opt_elems"] = list(trace.opt_reduce_elems)
    if rank == 0:
        report = {f"{b}/{o}": dict(step_s=statistics.median(r["times"]),
                                   beta_reduce_share=statistics.median(
                                       [s / t for s, t in zip(r["reduce_s"], r["times"])]),
                                   collectives=r["counts"], optimizer_all_reduce_elems=r["opt_elems"])
                  for (b, o), r in runs.items()}
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="llama_20m")
    p.add_argument("--backends", default="zero2,fsdp2", help="comma list of zero2, fsdp2")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)

    import tempfile

    import torch.multiprocessing as mp

    from tests.dist_cases import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        mp.spawn(worker, args=(args.world, free_port(), args, out), nprocs=args.world)
        with open(out) as f:
            report = json.load(f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{args.world} ranks, {args.device}, model {args.model}, seq {args.seq}, micro {args.micro}; "
          f"median of {args.steps} interleaved steps")
    print(f"{'variant':<30} {'step ms':>9} {'β all-reduce share':>19}  optimizer all-reduces (elements)  collectives/step")
    for name, r in report.items():
        colls = ", ".join(f"{k} {c[0]}x/{c[1]}" for k, c in sorted(r["collectives"].items()))
        print(f"{name:<30} {1e3 * r['step_s']:9.1f} {100 * r['beta_reduce_share']:18.3f}%  "
              f"{str(r['optimizer_all_reduce_elems']):<33} {colls}")
    print()
    for b in args.backends.split(","):
        base = report[f"{b}/adamw"]
        for o in ("am_adamw", "am_adamw_per_layer"):
            r = report[f"{b}/{o}"]
            extra = {k: (c[0] - base["collectives"].get(k, (0, 0))[0], c[1] - base["collectives"].get(k, (0, 0))[1])
                     for k, c in r["collectives"].items()}
            extra = {k: v for k, v in extra.items() if v != (0, 0)}
            print(f"{b}: {o} / adamw steps/s = {base['step_s'] / r['step_s']:.3f}; "
                  f"extra collectives per step vs AdamW: {extra or 'none'}")
    return report


if __name__ == "__main__":
    main()
