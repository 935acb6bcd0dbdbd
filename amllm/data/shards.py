"""Tokenized shards: a source's documents as one flat token stream per split, on disk, memory-mapped.

Layout (nanoGPT style)::

    <data_dir>/<source>-<tokenizer name>/
        train.bin      doc0 EOS doc1 EOS ...   numpy uint16 (vocab <= 65536) or uint32, no header
        val.bin        the same for the validation split
        manifest.json  what was prepared (see :func:`prepare`); written LAST, so a directory is complete
                       exactly when its manifest exists and matches the .bin sizes

:func:`prepare` is idempotent: when a complete manifest for the same source, tokenizer fingerprint
and caps exists, it returns at once. Everything is written to temporary files and renamed into
place, so an interrupted prepare never looks complete. :func:`load_shards` opens the shards
read-only and checks them against the manifest and the tokenizer the run asked for.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from amllm.config import DataConfig
from amllm.data.errors import DataError
from amllm.data.sources import count_documents, iter_documents, source_details
from amllm.data.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
SPLITS = {"train": "train", "val": "validation"}
"""Shard split name -> source split name."""
MANIFEST = "manifest.json"
_BATCH_CHARS = 2_000_000  # characters per encode_batch call: big enough for threads, small in memory


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_dir(cfg: DataConfig, tokenizer: Tokenizer) -> Path:
    return Path(cfg.data_dir) / f"{cfg.source}-{tokenizer.name}"


def _identity(cfg: DataConfig, tokenizer: Tokenizer) -> dict:
    """The manifest fields that must match for existing shards to be reused."""
    return {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "source_details": source_details(cfg),
        "tokenizer": tokenizer.describe(),
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "caps": {"train": cfg.train_tokens, "val": cfg.val_tokens},
    }


def _differences(manifest: dict, wanted: dict) -> list[str]:
    diff = [k for k, v in wanted.items() if json.loads(json.dumps(v)) != manifest.get(k)]
    if "tokenizer" in diff and manifest.get("tokenizer", {}).get("fingerprint") == wanted["tokenizer"]["fingerprint"]:
        diff.remove("tokenizer")  # same model file under another spelling of its path
    return diff


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; delete {Path(directory)} and run prepare again") from None


def _sizes_ok(directory: Path, manifest: dict) -> bool:
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split, info in manifest["splits"].items():
        f = directory / info["file"]
        if not f.is_file() or f.stat().st_size != info["n_tokens"] * itemsize:
            return False
    return True


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def write_split(docs: Iterable[str], tokenizer: Tokenizer, path: Path, cap: int | None = None,
                total_docs: int | None = None, desc: str = "", progress: bool = True) -> dict:
    """Tokenize `docs` (each followed by EOS) into the flat file `path`, stopping at `cap` tokens.

    Writes ``path`` atomically. Returns ``{"file", "n_tokens", "n_docs", "capped"}``; a capped split
    ends inside its last document.
    """
    from tqdm.auto import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n_tokens = n_docs = 0
    capped = False
    bar = tqdm(total=cap if cap else total_docs, unit="tok" if cap else "doc", unit_scale=bool(cap),
               desc=desc, disable=not progress, leave=False)
    try:
        with open(tmp, "wb") as f:
            for batch in _batches(docs):
                for ids in tokenizer.encode_batch(batch):
                    ids = np.asarray(ids + [tokenizer.eos_id], dtype=dtype)
                    if cap is not None and n_tokens + len(ids) >= cap:
                        ids, capped = ids[: cap - n_tokens], True
                    ids.tofile(f)
                    n_tokens += len(ids)
                    n_docs += 1
                    bar.update(len(ids) if cap else 1)
                    if capped:
                        break
                bar.set_postfix(docs=n_docs, tokens=n_tokens, refresh=False)
                if capped:
                    break
        os.replace(tmp, path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "n_tokens": n_tokens, "n_docs": n_docs, "capped": capped}


def prepare(cfg: DataConfig, progress: bool = True, tokenizer: Tokenizer | None = None) -> Path:
    """Tokenize the configured source into shards unless a matching complete set exists; return its
    directory. Call it on rank 0 only (then barrier); it trains sotu-sp8k first if needed."""
    if cfg.source == "c4_hub" and (cfg.train_tokens is None or cfg.val_tokens is None):
        raise DataError("data.source=c4_hub streams ~156B tokens; set data.train_tokens and data.val_tokens "
                        "(e.g. data.train_tokens=300_000_000 data.val_tokens=10_000_000)")
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer, cfg.data_dir, cfg.num_proc)
    out = shard_dir(cfg, tokenizer)
    wanted = _identity(cfg, tokenizer)
    manifest = read_manifest(out)
    if manifest is not None:
        diff = _differences(manifest, wanted)
        if not diff and _sizes_ok(out, manifest):
            return out
        why = f"{', '.join(diff)} changed" if diff else "shard files do not match the manifest"
        if progress:
            print(f"[data] re-preparing {out}: {why}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here until the end, the directory is incomplete

    start = time.time()
    splits = {}
    for split, source_split in SPLITS.items():
        cap = cfg.train_tokens if split == "train" else cfg.val_tokens
        docs = iter_documents(cfg, source_split)
        splits[split] = write_split(docs, tokenizer, out / f"{split}.bin", cap, count_documents(cfg, source_split),
                                    desc=f"{cfg.source} {split}", progress=progress)
        if splits[split]["n_docs"] == 0:
            raise DataError(f"data.source={cfg.source} has no {source_split} documents"
                            f"{f' in {cfg.path}' if cfg.path and cfg.source == 'c4_local' else ''}; "
                            f"add data (non-empty c4-{source_split}.*.json.gz files) or choose another source")
    manifest = {**wanted, "splits": splits, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.time() - start, 2)}
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if progress:
        summary = ", ".join(f"{s} {v['n_tokens']:,} tokens / {v['n_docs']:,} docs" for s, v in splits.items())
        print(f"[data] prepared {out} in {manifest['seconds']:.1f}s: {summary}")
    return out


def load_shards(directory: str | os.PathLike, tokenizer: Tokenizer | None = None,
                seq_len: int | None = None) -> tuple[np.memmap, np.memmap, dict]:
    """Open ``train.bin`` and ``val.bin`` read-only as 1-D memmaps and return them with the manifest.

    Checks that the files exist and have exactly the manifest's token counts, that they were made
    with `tokenizer` (when given: same fingerprint) and that each split holds at least one
    ``seq_len + 1`` window (when `seq_len` is given). Each problem is a one-line :class:`DataError`.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(f"no {MANIFEST} in {directory} (not prepared, or prepare was interrupted); "
                        f"run `python -m tools.prepare_data` with the same data.* settings")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{directory} has shard format {manifest.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}; delete it and run `python -m tools.prepare_data` again")
    if tokenizer is not None and manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        had = manifest["tokenizer"]
        raise DataError(f"{directory} was tokenized with {had['spec']!r} (fingerprint {had['fingerprint'][:12]}), "
                        f"not the requested {tokenizer.spec!r} ({tokenizer.fingerprint[:12]}); re-run prepare "
                        f"(`python -m tools.prepare_data data.tokenizer={tokenizer.spec}`) or point data.data_dir elsewhere")
    dtype = np.dtype(manifest["dtype"])
    arrays = []
    for split in SPLITS:
        info = manifest["splits"][split]
        path = directory / info["file"]
        if not path.is_file():
            raise DataError(f"{path} is missing; run `python -m tools.prepare_data` again to rebuild {directory}")
        size, expected = path.stat().st_size, info["n_tokens"] * dtype.itemsize
        if size != expected:
            raise DataError(f"{path} is truncated or corrupt ({size} bytes, manifest says {info['n_tokens']} "
                            f"{dtype.name} tokens = {expected} bytes); delete {directory} and run prepare again")
        if seq_len is not None and info["n_tokens"] < seq_len + 1:
            raise DataError(f"the {split} split of {directory} has {info['n_tokens']} tokens, fewer than "
                            f"data.seq_len+1={seq_len + 1}; use more data (data.train_tokens/val_tokens, "
                            f"another source) or a smaller data.seq_len")
        arrays.append(np.memmap(path, dtype=dtype, mode="r") if info["n_tokens"] else np.zeros(0, dtype))
    return arrays[0], arrays[1], manifest
