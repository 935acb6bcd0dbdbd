"""Models of the paper's depths (8, 12, 24 blocks) at toy width, compiled, checkpointed and evaluated through
train.py: what a 4-block eager toy hides (a graph per block through the KV cache's layer index, Dynamo's
recompile limit of 8 at the first evaluation, hub-kernel side effects inside a checkpointed block).

References: the eager run of the same model (compile changes float rounding only), and the graph count
of the shallowest model (one graph per distinct call, whatever the depth)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from amllm.metrics import read_metrics

sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.compat  # also at the oldest declared versions (.ci/run)


def _records(run_dir, kind):
    return read_metrics(run_dir, kind)


def _run(train_overrides, run_dir, **kw):
    import train

    args = {"train.max_steps": 4, "eval.every": 2, "checkpoint.every": 0, **kw}
    assert train.main(train_overrides(run_dir, **args)) == 0
    return [r["loss"] for r in _records(run_dir, "train")], [r["val_loss"] for r in _records(run_dir, "eval")]


def _compiled(train_overrides, run_dir, **kw):
    """A compiled run's losses and what Dynamo did: graphs, graph breaks, frames recompiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    losses = _run(train_overrides, run_dir, **{"train.compile": "true", **kw})
    return losses, {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
                    "recompile_limit": sum(v for k, v in counters["stats"].items() if "limit" in k)}


@pytest.mark.slow
def test_compiled_8_block_model_trains_and_evaluates_as_eager(train_overrides, micro_model, tmp_path):
    """LLaMA-60M's 8 blocks at toy width through train.py: compiled, and compiled under full and selective AC
    (blocks 0, 3, 6 checkpointed: two kinds of training block, one eval graph), train and
    evaluate (twice: steps 2 and 4) with the eager run's losses to float rounding; no graph break, and
    as few graphs as a 1-block model needs (train forward+backward, eval forward: the blocks share them).
    Fails on transformers 5.25 without the fixes: the eval hits the recompile limit (a graph per block
    through the KV cache), and AC + compile refuses the hub-kernel wrapper's context variable."""
    assert json.loads(open(micro_model).read())["num_hidden_layers"] == 8
    eager_train, eager_val = _run(train_overrides, tmp_path / "eager")
    assert len(eager_train) == 4 and len(eager_val) == 2
    for name, kw in (("compiled", {}), ("compiled_ac", {"train.activation_checkpointing": "full"}),
                     ("compiled_selective_ac", {"train.activation_checkpointing": "selective", "train.ac_every": 3})):
        (train_l, val_l), dyn = _compiled(train_overrides, tmp_path / name, **kw)
        torch.testing.assert_close(torch.tensor(train_l), torch.tensor(eager_train), rtol=1e-4, atol=0)
        torch.testing.assert_close(torch.tensor(val_l), torch.tensor(eager_val), rtol=1e-4, atol=0)
        assert dyn["breaks"] == 0 and dyn["recompile_limit"] == 0, (name, dyn)
        # the blocks' training forward (+ its backward) and eval forward; selective AC: two kinds of training block
        assert dyn["graphs"] == (3 if "selective" in name else 2), (name, dyn)


@pytest.mark.slow
def test_graph_count_does_not_grow_with_depth(train_overrides, narrow_model, tmp_path):
    """12 and 24 blocks (LLaMA-100M's and 350M/1B's depths) compile to the same number of graphs as 1
    block, in training and in two evaluations."""
    counts = {}
    for depth in (1, 12, 24):
        _, dyn = _compiled(train_overrides, tmp_path / f"d{depth}", **{"model.name": narrow_model(depth),
                                                                       "train.max_steps": 2, "eval.every": 1})
        assert dyn["breaks"] == 0 and dyn["recompile_limit"] == 0, (depth, dyn)
        counts[depth] = dyn["graphs"]
    assert counts[12] == counts[24] == counts[1] == 2, counts


TWO_RANKS = {  # launcher, overrides: compiled, checkpointed, sharded, at the paper's depths
    "fsdp2-12-blocks": ("torchrun", 12, {"parallel.backend": "fsdp2", "train.activation_checkpointing": "full"}),
    "zero2-8-blocks": ("deepspeed", 8, {"parallel.backend": "deepspeed", "train.activation_checkpointing": "full",
                                        "parallel.deepspeed_config": "configs/deepspeed/zero2_fp32.json"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TWO_RANKS))
def test_two_ranks_compiled_with_ac_match_one_eager_process(train_overrides, narrow_model, tmp_path, case):
    """2 CPU ranks through the real launchers, compiled and fully checkpointed: FSDP2 over 12 blocks
    (LLaMA-100M's depth; per-block compile), DeepSpeed ZeRO-2 over 8 (its engine compiles the whole
    module): the losses and two evaluations of one eager process to float rounding (the ranks sum in
    another order)."""
    from tests.dist_cases import cli_env, train_cli

    launcher, depth, backend = TWO_RANKS[case]
    if launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    over = {"model.name": narrow_model(depth), "train.max_steps": 4, "eval.every": 2, "checkpoint.every": 0}
    eager_train, eager_val = _run(train_overrides, tmp_path / "eager", **over)
    run_dir = tmp_path / case
    p = subprocess.run(train_cli(launcher, 2) + train_overrides(run_dir, **over, **backend, **{"train.compile": "true"}),
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in _records(run_dir, "train")]),
                               torch.tensor(eager_train), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor([r["val_loss"] for r in _records(run_dir, "eval")]),
                               torch.tensor(eager_val), rtol=1e-4, atol=0)


def test_a_compile_failure_stops_at_start_up_in_one_line(train_overrides, tmp_path):
    """A block that does not compile in evaluation only (a planted graph break under fullgraph) stops the
    run before its first step with one line saying what to do -- not at the first evaluation."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import amllm.parallel.blocks as blocks
real = blocks._block_forward
def planted(block, *a, **k):
    if not block.training:
        torch._dynamo.graph_break()
    return real(block, *a, **k)
blocks._block_forward = planted
import train
sys.exit(train.run_cli(sys.argv[1:]))
"""
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", code, *train_overrides(run_dir, **{"train.compile": "true"})],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: train.compile=true: the model does not compile ("), p.stderr
    assert "train.compile=false" in lines[0]
    assert not (run_dir / "metrics.jsonl").exists() or not _records(run_dir, "train")  # no step was trained


def test_the_model_keeps_no_kv_cache_and_no_hub_kernel_wrapper(micro_model):
    """Set on the model's config (whatever the transformers release calls the layers' cache argument): no
    cache is built in training or evaluation, and the attention runs transformers' own forward."""
    from transformers import DynamicCache

    from amllm.config import ModelConfig
    from amllm.model import CAUSAL_SDPA, build_model, load_llama_config

    hf = load_llama_config(ModelConfig(name=micro_model), vocab_size=32000)
    model = build_model(hf)
    assert hf.use_cache is not False and hf._attn_implementation == "sdpa"  # the caller's (exported) config untouched
    assert model.config.use_cache is False and model.config._attn_implementation == CAUSAL_SDPA
    built = []
    real_init = DynamicCache.__init__

    def counting(self, *a, **k):
        built.append(1)
        real_init(self, *a, **k)

    x = torch.randint(0, 32000, (2, 16))
    DynamicCache.__init__ = counting
    try:
        model.train()
        model(input_ids=x, targets=x).backward()
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=x).logits
    finally:
        DynamicCache.__init__ = real_init
    assert built == []
    for layer in model.model.layers:
        forward = getattr(layer.self_attn.forward, "__func__", layer.self_attn.forward)
        assert forward.__globals__["__name__"].split(".")[0] != "kernels"
    # causal without a mask: transformers' own model with its own mask (and cache) gives the same logits
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM(hf).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=x).logits, logits)
