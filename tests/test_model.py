"""Model configs: the paper's Table E.3 exactly, and honest parameter counts."""

import json

import pytest
import torch

pytestmark = pytest.mark.compat  # also at the oldest declared versions (.ci/run)

from amllm.config import ConfigError, ModelConfig
from amllm.model import MODELS_DIR, build_model, count_params, flops_per_token, load_llama_config, lm_loss

TABLE_E3 = {  # hidden, intermediate, heads, layers
    "llama_20m": (256, 688, 4, 4), "llama_60m": (512, 1376, 8, 8), "llama_100m": (640, 1708, 10, 12),
    "llama_350m": (1024, 2736, 16, 24), "llama_1b": (2048, 5461, 32, 24),
}


@pytest.mark.parametrize("name", sorted(TABLE_E3))
def test_paper_sizes(name):
    raw = json.loads((MODELS_DIR / f"{name}.json").read_text())
    h, i, heads, layers = TABLE_E3[name]
    assert (raw["hidden_size"], raw["intermediate_size"], raw["num_attention_heads"], raw["num_hidden_layers"]) == \
        (h, i, heads, layers)
    assert raw["hidden_act"] == "silu" and raw["vocab_size"] == 32000 and raw["max_position_embeddings"] == 1024
    assert raw["initializer_range"] == 0.02
    cfg = load_llama_config(ModelConfig(name=name), vocab_size=32000)
    # closed-form count: embed + head + layers * (4 h^2 + 3 h i + 2 h) + final norm
    expected = 2 * 32000 * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
    with torch.device("meta"):
        model = build_model(cfg)
    assert count_params(model)["total"] == expected


def test_llama_20m_is_about_20m_and_flops():
    cfg = load_llama_config(ModelConfig(name="llama_20m"), vocab_size=32000)
    with torch.device("meta"):
        n = count_params(build_model(cfg))
    assert 19e6 < n["total"] < 21e6
    assert flops_per_token(cfg, n["non_embedding"], 256) == 6 * n["non_embedding"] + 12 * 4 * 256 * 256


def test_vocab_follows_tokenizer_and_seed_fixes_weights():
    cfg = load_llama_config(ModelConfig(name="tiny"), vocab_size=300, eos_id=2)
    a, b = build_model(cfg, seed=1), build_model(cfg, seed=1)
    assert a.config.vocab_size == 300 and a.model.embed_tokens.weight.shape == (300, 128)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(build_model(cfg, seed=2).lm_head.weight, a.lm_head.weight)


def test_errors():
    with pytest.raises(ConfigError, match=r"model.name='llama_7b' is unknown; choose one of .*llama_20m"):
        load_llama_config(ModelConfig(name="llama_7b"), vocab_size=10)
    with pytest.raises(ConfigError, match=r"data.seq_len=2048 exceeds the model's max_position_embeddings=1024"):
        load_llama_config(ModelConfig(name="tiny"), vocab_size=10, seq_len=2048)


def test_lm_loss_matches_manual_log_softmax():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    manual = -torch.log_softmax(logits.double(), -1).gather(-1, y[..., None]).mean()
    assert torch.allclose(lm_loss(logits, y).double(), manual, atol=1e-6)


@pytest.mark.parametrize("change,msg", [
    ({"hidden_size": 30}, r"(hidden size \(30\) is not a multiple|hidden_size=30 is not a multiple)"),
    ({"num_key_value_heads": 3}, r"(num_key_value_heads|key.value)"),
    ({"num_hidden_layers": "two"}, r"transformers rejects this LlamaConfig|must be"),
])
def test_model_json_rejected_by_transformers_is_one_config_error(tmp_path, change, msg):
    raw = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 64}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**raw, **change}))
    with pytest.raises(ConfigError, match=msg) as e:
        load_llama_config(ModelConfig(name=str(path)), vocab_size=100)
    assert "\n" not in str(e.value) and "fix the model config" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_one_config_error():
    from amllm.distributed import pick_device

    with pytest.raises(ConfigError, match=r"train.device=cuda but no CUDA device is visible"):
        pick_device("cuda", 0)


def test_ranks_share_a_gpu_only_over_gloo(monkeypatch):
    """Two ranks on a one-GPU machine: NCCL refuses two ranks per GPU, so without
    parallel.dist_backend=gloo it is one error saying what to do; with it, rank 1 shares cuda:0."""
    from amllm.distributed import _backend_name, pick_device

    picked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 but this host shows 1 CUDA device.*dist_backend=gloo"):
        pick_device("cuda", 1)
    assert pick_device("auto", 1, "gloo") == torch.device("cuda", 0) and picked == [0]
    assert pick_device("cuda", 0) == torch.device("cuda", 0)
    assert _backend_name("auto", torch.device("cuda", 0)) == "nccl"
    assert _backend_name("gloo", torch.device("cuda", 0)) == "gloo"
    assert _backend_name("auto", torch.device("cpu")) == "gloo"
    with pytest.raises(ConfigError, match="parallel.dist_backend=nccl needs CUDA"):
        _backend_name("nccl", torch.device("cpu"))
