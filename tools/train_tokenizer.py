"""Train a LLaMA-style sentencepiece BPE (byte fallback, unk=0 bos=1 eos=2) on a source's train split.

    python -m tools.train_tokenizer --out data/tokenizers/sotu-sp16k --vocab-size 16384
    python -m tools.train_tokenizer --out tok/c4-32k --vocab-size 32000 --max-chars 2e9 \\
        data.source=c4_local data.path=/data/c4/en

Then use it with data.tokenizer=<out>/tokenizer.model. (sotu-sp8k is trained automatically.)
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time


from amllm.config import ConfigError, load_config
from amllm.data import DataError, iter_documents, load_tokenizer, train_sentencepiece


def _limit_chars(docs, max_chars: float):
    total = 0
    for doc in docs:
        if total >= max_chars:
            return
        total += len(doc)
        yield doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (gets tokenizer.model)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-docs", type=int, default=None, help="use at most this many documents")
    p.add_argument("--max-chars", type=float, default=1e9, help="use at most this many characters (default 1e9)")
    p.add_argument("--config", help="a YAML recipe (its data: section picks the source)")
    p.add_argument("overrides", nargs="*", help="data.key=value overrides (data.source, data.path, data.num_proc)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides).data
        docs = itertools.islice(iter_documents(cfg, "train"), args.max_docs)
        start = time.time()
        model = train_sentencepiece(_limit_chars(docs, args.max_chars), args.out, args.vocab_size, cfg.num_proc)
        tok = load_tokenizer(str(model))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{model}: vocab {tok.vocab_size}, trained in {time.time() - start:.1f}s, fingerprint {tok.fingerprint[:12]}; "
          f"use data.tokenizer={model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
