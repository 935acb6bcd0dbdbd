"""Tokenizers: one small class over sentencepiece or a Hugging Face tokenizer.

``data.tokenizer`` (a *spec*) names one of:

- ``sotu-sp8k``   a LLaMA-style sentencepiece BPE (vocab 8192, byte fallback, unk=0 bos=1 eos=2, no
                  pad) trained on the sotu train split the first time it is needed (about a second)
                  and cached in ``<data_dir>/tokenizers/sotu-sp8k/tokenizer.model``;
- ``mistral-v1``  the 32k LLaMA-format sentencepiece model shipped in PyPI ``mistral-common``;
- a path to a sentencepiece ``.model`` file;
- a Hugging Face tokenizer directory or hub name (``transformers.AutoTokenizer``).

``encode`` adds no BOS/EOS (the shard writer appends EOS after each document). ``fingerprint`` is a
sha256 of what defines the mapping text -> ids; manifests and checkpoints store it so a run never
silently mixes tokenizers. ``save_hf(dir)`` writes a tokenizer directory that
``AutoTokenizer.from_pretrained(dir)`` loads and that encodes exactly like sentencepiece.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from amllm.data.errors import DataError, one_line

SOTU_SP8K = "sotu-sp8k"
MISTRAL_V1 = "mistral-v1"
SOTU_TOKENIZER_VAL_FRACTION = 0.02
"""The sotu-sp8k tokenizer is trained on the sotu train split at this val_fraction (fixed, so that
the tokenizer does not depend on data.val_fraction)."""


# --------------------------------------------------------------------------------------------
# Training a sentencepiece model
# --------------------------------------------------------------------------------------------


def llama_sentencepiece_args(vocab_size: int, num_threads: int = 2) -> dict:
    """SentencePieceTrainer settings of the LLaMA / Mistral tokenizers (BPE, byte fallback, identity
    normalization, digits split, whitespace kept), so the model converts exactly to HF (save_hf)."""
    return dict(
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, character_coverage=0.99995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True,
        max_sentence_length=16384,        # sentences are paragraphs; don't drop the long ones
        input_sentence_size=2_000_000,    # sample at most this many paragraphs (bounds time and memory)
        shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2,
    )


def train_sentencepiece(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 8192,
                        num_threads: int = 2) -> Path:
    """Train a LLaMA-style BPE on the non-empty lines of `texts`; write ``out_dir/tokenizer.model``
    atomically (train in a temp dir next to it, then rename). Returns the model path."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    spm.set_random_generator_seed(0)  # deterministic paragraph sampling
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the shards
    try:
        with open(tmp / "tokenizer.model", "wb") as f:
            try:
                spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=f,
                                               **llama_sentencepiece_args(vocab_size, num_threads))
            except RuntimeError as e:
                raise DataError(f"sentencepiece training failed ({one_line(e)}); "
                                f"use more text or a smaller vocab size") from None
        if out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "tokenizer.model").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "tokenizer.model"


def _sotu_sp8k_model(data_dir: str | os.PathLike, num_threads: int) -> Path:
    model = Path(data_dir) / "tokenizers" / SOTU_SP8K / "tokenizer.model"
    if not model.is_file():
        from amllm.data.sources import sotu_documents

        train_sentencepiece(sotu_documents("train", SOTU_TOKENIZER_VAL_FRACTION), model.parent,
                            vocab_size=8192, num_threads=num_threads)
    return model


def _mistral_v1_model() -> Path:
    try:
        import mistral_common
    except ImportError:
        raise DataError("data.tokenizer=mistral-v1 needs the mistral-common package; pip install mistral-common") from None
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not model.is_file():
        raise DataError(f"{model} is missing from mistral-common; reinstall it: pip install -U mistral-common")
    return model


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> ids with one interface for sentencepiece and Hugging Face tokenizers.

    Build it with :func:`load_tokenizer`. Attributes: ``name`` (short, used in shard directory names),
    ``spec`` (what the user wrote), ``vocab_size``, ``eos_id``, ``fingerprint`` (sha256 hex).
    """

    def __init__(self, name: str, spec: str, *, sp=None, hf=None, model_file: Path | None = None,
                 num_threads: int = 2) -> None:
        assert (sp is None) != (hf is None)
        self.name, self.spec, self.num_threads = name, spec, num_threads
        self._sp, self._hf, self.model_file = sp, hf, model_file
        if sp is not None:
            self.vocab_size = sp.get_piece_size()
            self.eos_id = sp.eos_id()
            if self.eos_id < 0:
                raise DataError(f"tokenizer {spec!r} has no EOS piece; train it with eos_id=2 (tools/train_tokenizer.py does)")
            self.fingerprint = _sha256(Path(model_file).read_bytes())
        else:
            self.vocab_size = len(hf)
            if hf.eos_token_id is None:
                raise DataError(f"tokenizer {spec!r} has no eos_token; documents are separated by EOS, pick another tokenizer")
            self.eos_id = int(hf.eos_token_id)
            backend = getattr(hf, "backend_tokenizer", None)
            defining = backend.to_str() if backend is not None else repr(sorted(hf.get_vocab().items()))
            self.fingerprint = _sha256(f"{type(hf).__name__}\n{defining}".encode())

    @classmethod
    def from_sentencepiece(cls, model_file: str | os.PathLike, name: str, spec: str | None = None,
                           num_threads: int = 2) -> Tokenizer:
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.is_file():
            raise DataError(f"sentencepiece model {str(model_file)!r} not found; check data.tokenizer")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise DataError(f"{model_file}: not a sentencepiece model ({one_line(e)}); check data.tokenizer") from None
        return cls(name, spec or str(model_file), sp=sp, model_file=model_file, num_threads=num_threads)

    @classmethod
    def from_hf(cls, name_or_dir: str) -> Tokenizer:
        from transformers import AutoTokenizer

        local = Path(name_or_dir).expanduser()
        kwargs = {"split_special_tokens": True}  # text that spells "</s>" is text, not EOS
        if local.is_dir():
            source, name = str(local), f"hf-{local.resolve().name}"
        else:
            from amllm.data.sources import _hub_reachable, hub_offline

            source, name = name_or_dir, "hf-" + name_or_dir.replace("/", "--")
            if hub_offline() or not _hub_reachable():
                kwargs["local_files_only"] = True  # only the local HF cache; no minutes of retries
        try:
            hf = AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            where = ("the Hugging Face hub is unreachable and it is not cached"
                     if kwargs.get("local_files_only") else one_line(e, 120))
            raise DataError(f"cannot load tokenizer {name_or_dir!r} ({where}); use sotu-sp8k, mistral-v1, "
                            f"a sentencepiece .model path or a local tokenizer directory") from None
        return cls(name, name_or_dir, hf=hf)

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no BOS/EOS added."""
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text; parallel inside the library (sentencepiece threads / HF Rust)."""
        if self._sp is not None:
            return self._sp.encode(list(texts), num_threads=self.num_threads)
        return self._hf(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids)

    def describe(self) -> dict:
        """The manifest / checkpoint record of this tokenizer."""
        return {"spec": self.spec, "name": self.name, "fingerprint": self.fingerprint,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    # -- Hugging Face export ----------------------------------------------------------------------

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        """Write a tokenizer directory for ``AutoTokenizer.from_pretrained(out_dir)`` (HF export)."""
        out_dir = Path(out_dir)
        if self._hf is not None:
            self._hf.save_pretrained(out_dir)
        else:
            _sentencepiece_to_hf(self._sp, self.model_file).save_pretrained(out_dir)
        return out_dir

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _sentencepiece_to_hf(sp, model_file: Path):
    """A fast HF tokenizer that reproduces a LLaMA-format sentencepiece BPE id for id.

    transformers' own LlamaTokenizer does not: its Metaspace pre-tokenizer adds no "▁" before text
    that starts with a space, and it ranks merges by piece id, which differs from sentencepiece's
    score order where whitespace-only pieces have a tied score (mistral-v1). So we build the
    `tokenizers` pipeline sentencepiece runs: prepend "▁", spaces -> "▁" (no pre-split), BPE with
    merges ranked by score (transformers' generate_merges), byte fallback.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    unsupported = []
    if ts.model_type != ts.BPE:
        unsupported.append("model_type is not BPE")
    if ns.name != "identity" or ns.precompiled_charsmap:
        unsupported.append(f"normalization {ns.name!r} is not identity")
    if ns.remove_extra_whitespaces or ts.treat_whitespace_as_suffix:
        unsupported.append("whitespace is rewritten")
    if any(p.type == p.USER_DEFINED for p in proto.pieces):
        unsupported.append("it has user-defined pieces")
    if unsupported:
        raise DataError(f"{model_file}: HF export supports LLaMA-format sentencepiece BPE models only "
                        f"({'; '.join(unsupported)}); train one with tools/train_tokenizer.py")

    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)
                 if i not in special and not sp.is_byte(i)}
    unk = sp.id_to_piece(sp.unk_id())
    rust = RustTokenizer(BPE(vocab=vocab, merges=generate_merges(vocab, mergeable), unk_token=unk,
                             fuse_unk=True, byte_fallback=True))
    prefix = [normalizers.Prepend("▁")] if ns.add_dummy_prefix else []
    rust.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    rust.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if ns.add_dummy_prefix else []))
    rust.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    return PreTrainedTokenizerFast(tokenizer_object=rust, bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()),
                                   unk_token=unk, pad_token=piece(sp.pad_id()), split_special_tokens=True,
                                   clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------


def load_tokenizer(spec: str, data_dir: str | os.PathLike = "data", num_threads: int = 2) -> Tokenizer:
    """The tokenizer named by `spec` (see the module docstring); trains sotu-sp8k on first use."""
    if spec == SOTU_SP8K:
        return Tokenizer.from_sentencepiece(_sotu_sp8k_model(data_dir, num_threads), SOTU_SP8K, spec, num_threads)
    if spec == MISTRAL_V1:
        return Tokenizer.from_sentencepiece(_mistral_v1_model(), MISTRAL_V1, spec, num_threads)
    path = Path(spec).expanduser()
    if path.suffix == ".model" or path.is_file():
        tok = Tokenizer.from_sentencepiece(path, "", spec, num_threads)
        tok.name = f"sp-{path.stem}-{tok.fingerprint[:8]}"
        return tok
    return Tokenizer.from_hf(spec)
