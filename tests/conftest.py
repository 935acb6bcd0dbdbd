"""Shared fixtures: one prepared corpus + tokenizer per test session, and a micro LLaMA config."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from tests.dist_cases import free_port  # noqa: F401  (one helper for every multi-process test)

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The optimizer's Triton kernels run on CPU tensors under Triton's interpreter. The variable must be
# set before anything imports triton (deepspeed does): triton's own library functions (tl.sum, ...)
# are compiled-mode or interpreted depending on its value at import. AMLLM_TEST_DEVICE=cuda runs
# them compiled on the GPU instead.
if os.environ.get("AMLLM_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Test modules that import an extra the smoke install lacks (.[smoke]: CI's compatibility job, -m compat)
# at import time: not collected there, instead of failing the collection.
collect_ignore = [f for f, module in (("test_plot_summarize.py", "matplotlib"),) if importlib.util.find_spec(module) is None]


def narrow_model_json(path: Path, depth: int) -> str:
    """A LLaMA of the paper's depth at toy width (hidden 32): what compile, AC, eval, resume and
    sharding see per block is there (one graph for ``depth`` blocks, ``depth`` FSDP units, cache
    arguments per layer), at a cost dominated by the 32k-vocabulary embedding and head."""
    path.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "num_key_value_heads": 2, "num_hidden_layers": depth, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "vocab_size": 32000, "max_position_embeddings": 256, "initializer_range": 0.02,
        "tie_word_embeddings": False}))
    return str(path)


@pytest.fixture(scope="session")
def narrow_model(tmp_path_factory):
    """``narrow_model(depth)``: the path of a narrow LLaMA JSON with ``depth`` blocks."""
    d = tmp_path_factory.mktemp("models")
    return lambda depth: narrow_model_json(d / f"narrow{depth}.json", depth)


@pytest.fixture(scope="session")
def micro_model(narrow_model) -> str:
    """The model of the train.py tests: the paper's smallest multi-block depth (8, LLaMA-60M's) at toy width."""
    return narrow_model(8)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """The embedded corpus tokenized once for the whole session (the default sotu-sp8k tokenizer)."""
    from amllm.config import DataConfig
    from amllm.data import prepare

    d = tmp_path_factory.mktemp("data")
    prepare(DataConfig(data_dir=str(d)), progress=False)
    return str(d)


@pytest.fixture
def train_overrides(micro_model, data_dir, tmp_path):
    """Overrides for a fast deterministic micro run; tests add their own."""
    def make(run_dir: Path | None = None, **extra) -> list[str]:
        base = {"run_dir": str(run_dir or tmp_path / "run"), "model.name": micro_model, "data.data_dir": data_dir,
                "data.seq_len": 64, "train.batch_size": 4, "train.micro_batch_size": 2, "train.max_steps": 6,
                "schedule.warmup_steps": 2, "eval.every": 3, "eval.tokens": 2048, "checkpoint.every": 3,
                "log.progress": False, "train.threads": 1}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]
    return make


@pytest.fixture
def triton_device(monkeypatch):
    """Where tests of the Triton optimizer kernels run: Triton's interpreter on CPU tensors,
    or the device named by ``AMLLM_TEST_DEVICE`` (e.g. ``cuda``, from tools/gpu_check.sh)."""
    import torch

    device = torch.device(os.environ.get("AMLLM_TEST_DEVICE", "cpu"))
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return device


def python() -> str:
    return sys.executable
