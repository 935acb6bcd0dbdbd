"""Data pipeline throughput: sampler + memmap -> int64 batches, and prepare's tokenization.

    python -m tools.bench_data [--data-dir data] [--batch 8] [--seq-len 256] [--steps 2000]

The trainer needs >= 50x its own tokens/s from the sampler (LLaMA-20M on CPU: ~1,050 tok/s).
"""

from __future__ import annotations

import argparse
import sys
import time


from amllm.config import DataConfig
from amllm.data import BatchSampler, load_shards, load_tokenizer, prepare
from amllm.data.sources import sotu_documents


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    cfg = DataConfig(data_dir=args.data_dir, seq_len=args.seq_len, num_proc=args.threads)
    tok = load_tokenizer(cfg.tokenizer, cfg.data_dir, args.threads)
    train, _, _ = load_shards(prepare(cfg, progress=False), tok, cfg.seq_len)

    sampler = BatchSampler(train, args.seq_len, args.batch, args.batch, seed=0)
    sampler.next_batch()  # warm the permutation cache
    start = time.perf_counter()
    for _ in range(args.steps):
        sampler.next_batch()
    dt = time.perf_counter() - start
    print(f"sampler  {args.steps * args.batch * args.seq_len / dt:14,.0f} tok/s  "
          f"({args.batch}x{args.seq_len} int64 batches, {dt / args.steps * 1e6:.0f} us/batch)")

    docs = list(sotu_documents("train"))[:60]
    start = time.perf_counter()
    n = sum(len(ids) + 1 for ids in tok.encode_batch(docs))
    dt = time.perf_counter() - start
    print(f"tokenize {n / dt:14,.0f} tok/s  ({tok.name}, {args.threads} threads, {sum(map(len, docs)) / dt / 1e6:.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
