"""Tokenize a data source into shards (what train.py does on rank 0 before its first step).

    python -m tools.prepare_data                                  # sotu + sotu-sp8k (the default job)
    python -m tools.prepare_data data.source=c4_local data.path=/data/c4/en data.tokenizer=mistral-v1 \\
        data.train_tokens=300_000_000 data.val_tokens=10_000_000
    python -m tools.prepare_data --config configs/some_recipe.yaml data.num_proc=8
    python -m tools.prepare_data --config configs/cpu/study_warmup.yaml --unigram   # + the unigram baseline

Safe to re-run: an up-to-date shard directory is left alone; prints where the shards are.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from amllm.config import ConfigError, load_config
from amllm.data import DataError, load_shards, prepare


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab: int, seq_len: int, tokens: int) -> float:
    """The cross-entropy (nats) of a unigram model on the validation targets the trainer evaluates (the
    same windows as ``val_batches``): token frequencies of the whole train split, add-one smoothed. A
    language model's loss is only news below this line -- a run that ends near it has learned little
    more than token frequencies."""
    from amllm.data.sampler import val_batches

    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab).astype(np.float64) + 1.0
    targets = np.concatenate([y.numpy().ravel() for _, y in val_batches(np.asarray(val), seq_len, tokens, 1 << 20)])
    return float(-np.log(counts[targets] / counts.sum()).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML recipe (its data: section is used)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--unigram", action="store_true",
                   help="also print a unigram model's loss on the eval windows (eval.tokens of the recipe)")
    p.add_argument("overrides", nargs="*", help="data.key=value overrides")
    args = p.parse_args(argv)
    try:
        full = load_config(args.config, args.overrides)
        cfg = full.data
        out = prepare(cfg, progress=not args.quiet)
        train, val, man = load_shards(out, seq_len=cfg.seq_len)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: train {len(train):,} tokens ({man['splits']['train']['n_docs']:,} docs), "
          f"val {len(val):,} tokens ({man['splits']['val']['n_docs']:,} docs), {man['dtype']}, "
          f"tokenizer {man['tokenizer']['spec']} (vocab {man['tokenizer']['vocab_size']})")
    if args.unigram:
        loss = unigram_loss(train, val, man["tokenizer"]["vocab_size"], cfg.seq_len, full.eval.tokens)
        print(f"unigram loss on the {full.eval.tokens:,}-token eval windows (seq_len {cfg.seq_len}): {loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
