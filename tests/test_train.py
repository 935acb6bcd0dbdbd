"""train.py end to end: bit-exact resume, DDP = 1 process, emulated nodes, HF export, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port

from amllm.metrics import read_metrics

sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def metrics(run: Path, kind: str = "train") -> list[dict]:
    return read_metrics(run, kind)


def final_params(run: Path, step: int) -> dict:
    from amllm.parallel.full_state import full_model_state

    return full_model_state(run / f"step-{step}")


@pytest.mark.compat
@pytest.mark.parametrize("optim, impl, precision", [("adamw", "auto", "fp32"), ("am_adamw", "auto", "fp32"),
                                                    ("am_adamw", "fused", "fp32"), ("am_adamw", "auto", "bf16_pure")])
def test_resume_is_bit_exact(train_overrides, tmp_path, optim, impl, precision):
    """bf16_pure: the fp32 moments of bf16 weights and the stochastic-rounding counter are restored."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    kw = {"optim.name": optim, "optim.impl": impl, "train.precision": precision}
    assert train.main(train_overrides(straight, **kw)) == 0
    # a pre-emption after step 4 (between checkpoints, so the stop path itself saves), then resume
    os.environ["AMLLM_TEST_STOP_AT_STEP"] = "4"
    try:
        assert train.main(train_overrides(split, **kw)) == train.PREEMPTED_EXIT
    finally:
        del os.environ["AMLLM_TEST_STOP_AT_STEP"]
    assert [p.name for p in ckpt_dirs(split)] == ["step-3", "step-4"]
    assert train.main(train_overrides(split, **kw)) == 0
    a, b = metrics(straight), metrics(split)
    assert [r["step"] for r in b] == list(range(1, 7))        # resumed file reads as one run
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["beta"] for r in a] == [r["beta"] for r in b]
    pa, pb = final_params(straight, 6), final_params(split, 6)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a[0]["loss"] != a[-1]["loss"]  # it trained


def ckpt_dirs(run: Path) -> list[Path]:
    from amllm.checkpoint import list_checkpoints

    return list_checkpoints(run)


@pytest.mark.compat
def test_eval_only_and_hf_export_round_trip(train_overrides, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_overrides(run)) == 0
    final_eval = metrics(run, "eval")[-1]["val_loss"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tools.export_hf as export_hf

    assert export_hf.main([str(run), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = final_params(run, 6)
    x = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    from amllm.model import build_model

    ref = build_model(hf.config).eval()
    ref.load_state_dict(ours)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    from amllm.config import load_config
    from amllm.data import load_tokenizer

    cfg = load_config(run / "config.yaml")
    sp = load_tokenizer(cfg.data.tokenizer, cfg.data.data_dir)
    text = "Fellow-Citizens of the Senate and House of Representatives: the state of the Union is strong."
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)

    # --eval-only on the final checkpoint reproduces the final in-run evaluation exactly
    out = subprocess.run([sys.executable, "-m", "tools.evaluate", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"val_loss {final_eval:.4f}" in out.stdout
    empty = subprocess.run([sys.executable, "train.py", "--eval-only", f"run_dir={tmp_path / 'empty'}"], cwd=ROOT,
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "--eval-only: no complete step-N/ checkpoint" in empty.stderr


def _torchrun(args: list[str], overrides: list[str], env_extra=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, "train.py", *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _same_run(a: Path, b: Path, step: int) -> None:
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) == step
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["beta"] == pytest.approx(rb["beta"], abs=1e-5)
    ea, eb = metrics(a, "eval"), metrics(b, "eval")
    assert [r["val_loss"] for r in ea] == pytest.approx([r["val_loss"] for r in eb], rel=1e-5)
    assert [r["val_tokens"] for r in ea] == [r["val_tokens"] for r in eb]
    pa, pb = final_params(a, step), final_params(b, step)
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.compat
@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(train_overrides, tmp_path):
    """Same global batch (4 sequences): 1 process x 2 micro-steps vs 2 DDP ranks x 1 micro-step."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(train_overrides(one, **{"train.micro_batch_size": 1})) == 0
    p = _torchrun(["--nproc_per_node", "2", "--master_port", str(free_port())],
                  train_overrides(two, **{"train.micro_batch_size": 1}))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    _same_run(one, two, 6)
    # eval is identical across world sizes: the val windows split 1/2 ways, summed token-weighted
    # (checked in _same_run); and DDP did not double-count the AM statistics (β equal above).


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_two_torchrun_agents_emulate_two_nodes(train_overrides, tmp_path, backend):
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    assert train.main(train_overrides(one, **{"train.micro_batch_size": 1, "train.max_steps": 3})) == 0
    port = str(free_port())
    agents = [_torchrun(["--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1",
                         "--master_addr", "127.0.0.1", "--master_port", port],
                        train_overrides(nodes, **{"train.micro_batch_size": 1, "train.max_steps": 3,
                                                  "parallel.backend": backend}))
              for r in (0, 1)]
    for a in agents:
        out, _ = a.communicate(timeout=600)
        assert a.returncode == 0, out[-3000:]
    assert (nodes / "DONE").exists() and (nodes / "step-3" / "meta.json").is_file()
    assert json.loads((nodes / "step-3" / "meta.json").read_text())["world_size"] == 2
    _same_run(one, nodes, 3)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra, message", [
    (["optim.lrr=1"], r"error: unknown config key 'optim.lrr'; did you mean 'lr'\?"),
    (["train.precision=fp8"], r"error: train.precision='fp8' is not valid"),
    (["data.source=c4_local", "data.path=/nonexistent/c4"], r"error: .*/nonexistent/c4"),
    (["train.batch_size=6", "train.micro_batch_size=4"], r"error: train.micro_batch_size=4 does not divide"),
    (["data.seq_len=512"], r"error: data.seq_len=512 exceeds the model's max_position_embeddings=256"),
])
def test_bad_input_is_one_line_and_writes_nothing(train_overrides, tmp_path, extra, message):
    run = tmp_path / "bad"
    res = _cli(train_overrides(run) + extra)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    import re

    assert re.search(message, res.stderr.strip().splitlines()[-1]), res.stderr[-2000:]
    assert not list(run.glob("step-*")) and not (run / "metrics.jsonl").exists()


def test_checkpoint_of_another_model_is_refused(train_overrides, tmp_path, micro_model):
    run = tmp_path / "run"
    assert train.main(train_overrides(run, **{"train.max_steps": 3})) == 0
    before = sorted(p.name for p in run.iterdir())
    res = _cli(train_overrides(run, **{"model.name": "tiny"}))
    assert res.returncode == 2
    assert re_search(r"error: .*step-3 was saved with another model architecture", res.stderr)
    assert sorted(p.name for p in run.iterdir()) == before


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


@pytest.mark.parametrize("precision", ["bf16", "bf16_pure"])
def test_bf16_precisions_track_fp32(train_overrides, tmp_path, precision):
    """bf16 autocast and pure-bf16 weights train; losses stay within bf16 resolution of fp32's."""
    ref, run = tmp_path / "fp32", tmp_path / precision
    over = {"train.max_steps": 3, "eval.every": 0, "optim.name": "am_adamw"}
    assert train.main(train_overrides(ref, **over)) == 0
    assert train.main(train_overrides(run, **over, **{"train.precision": precision})) == 0
    a, b = metrics(ref), metrics(run)
    for ra, rb in zip(a, b):
        # bf16 has an 8-bit mantissa (~0.4% relative); the loss of a ~9 nat model moves < 0.1 nat
        assert abs(ra["loss"] - rb["loss"]) < 0.1, (ra["loss"], rb["loss"])
        assert 0.0 <= rb["beta"] <= 0.9
    params = final_params(run, 3)
    want = torch.bfloat16 if precision == "bf16_pure" else torch.float32
    assert all(p.dtype == want and torch.isfinite(p.float()).all() for p in params.values())
    # the AM statistics stay float32 even when the weights are bf16
    opt = torch.load(run / "step-3" / "optimizer.pt", weights_only=True)
    floats = [t for t in _tensors(opt) if t.is_floating_point() and t.numel() == 1]
    assert floats and all(t.dtype in (torch.float32, torch.float64) for t in floats)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.slow
def test_wandb_offline_resume_keeps_the_run_id(train_overrides, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = tmp_path / "run"
    monkeypatch.setenv("AMLLM_TEST_STOP_AT_STEP", "2")
    assert train.main(train_overrides(run, **{"log.wandb": "offline", "train.max_steps": 4})) == train.PREEMPTED_EXIT
    first = torch.load(run / "step-2" / "trainer.pt", weights_only=True)["wandb_id"]
    monkeypatch.delenv("AMLLM_TEST_STOP_AT_STEP")
    assert first
    assert train.main(train_overrides(run, **{"log.wandb": "offline", "train.max_steps": 4})) == 0
    assert torch.load(run / "step-4" / "trainer.pt", weights_only=True)["wandb_id"] == first
    runs = list((run / "wandb").glob(f"offline-run-*-{first}"))
    assert len(runs) == 2  # two offline sessions of the same run id, synced as one run


def _deepspeed(overrides: list[str], env_extra=None) -> subprocess.CompletedProcess:
    """The `deepspeed` CLI through launch/deepspeed_multinode.sh (no hostfile: 2 local ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUM_GPUS": "2", "MASTER_PORT": str(free_port()),
           "DS_CONFIG": "configs/deepspeed/zero2_fp32.json",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(env_extra or {})}
    env.pop("HOSTFILE", None)
    # the first DeepSpeed start on CPU JIT-builds a small op (~60 s); build it once per checkout
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return subprocess.run(["bash", "launch/deepspeed_multinode.sh", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.compat
@pytest.mark.slow
def test_fsdp2_via_torchrun_matches_one_process_and_resumes_on_one(train_overrides, tmp_path):
    """parallel.backend=fsdp2 on 2 ranks = 1 process; saved on 2 ranks (a pre-emption at step 4),
    resumed on 1 process from the DCP files, it ends where the uninterrupted run ends."""
    one, two = tmp_path / "one", tmp_path / "two"
    over = {"train.micro_batch_size": 1}
    assert train.main(train_overrides(one, **over)) == 0
    p = _torchrun(["--nproc_per_node", "2", "--master_port", str(free_port())],
                  train_overrides(two, **over, **{"parallel.backend": "fsdp2"}), {"AMLLM_TEST_STOP_AT_STEP": "4"})
    out, _ = p.communicate(timeout=600)
    # torchrun itself exits 1 when its workers exit non-zero; the workers' own status is 75
    assert "stopped at step 4" in out and f"exitcode  : {train.PREEMPTED_EXIT}" in out, out[-3000:]
    assert (two / "step-4" / "dcp").is_dir() and not (two / "step-4" / "model.pt").exists()
    assert train.main(train_overrides(two, **over)) == 0  # 1 process, plain path, reads the DCP shards
    _same_run(one, two, 6)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_cli_zero2_matches_one_process_and_resumes(train_overrides, tmp_path):
    """`deepspeed --num_gpus 2 train.py ... parallel.backend=deepspeed` via launch/ (ZeRO-2, per-layer β):
    the same losses and β as 1 process; stopped at step 4 and resumed on 2 ranks, it continues."""
    pytest.importorskip("deepspeed")
    one, two = tmp_path / "one", tmp_path / "two"
    over = {"train.micro_batch_size": 1, "optim.per_layer": True}
    assert train.main(train_overrides(one, **over)) == 0
    ds = dict(over)  # the launcher script adds parallel.backend=deepspeed and the JSON
    first = _deepspeed(train_overrides(two, **ds), {"AMLLM_TEST_STOP_AT_STEP": "4"})
    assert (two / "step-4" / "deepspeed").is_dir(), first.stdout[-3000:] + first.stderr[-3000:]
    second = _deepspeed(train_overrides(two, **ds))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout
    _same_run(one, two, 6)
