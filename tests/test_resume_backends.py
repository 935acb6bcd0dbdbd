"""Resume checks that hold on every backend: changed optimizer hyper-parameters, per-rank RNG states.

The hyper-parameters a run was saved with travel in trainer.pt (``optim_hparams``), so the check does
not depend on the backend's optimizer-state layout (DDP's optimizer.pt, FSDP2's DCP shards,
DeepSpeed's per-rank files): a changed λ or weight decay is refused on every backend, and applied on
every backend with ``checkpoint.allow_changes=[optimizer_hparams]``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT, free_port
from tests.dist_cases import cli_env, train_cli


def _run(backend: str, over: list[str]) -> tuple[int, str]:
    p = subprocess.run(train_cli("deepspeed" if backend == "deepspeed" else "torchrun", 2) + over, cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", pytest.param("deepspeed", marks=pytest.mark.deepspeed)])
def test_changed_optimizer_hparams_are_refused_then_allowed(train_overrides, tmp_path, backend):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    extra = {"parallel.backend": backend, "train.micro_batch_size": 1, "eval.every": 0, "checkpoint.every": 2}
    if backend == "deepspeed":
        extra["parallel.deepspeed_config"] = "configs/deepspeed/zero2_fp32.json"
    run = tmp_path / "run"
    rc, out = _run(backend, train_overrides(run, **extra, **{"train.max_steps": 2}))
    assert rc == 0, out[-3000:]
    changed = {**extra, "train.max_steps": 4, "optim.lam": 0.5, "optim.weight_decay": 0.1}
    rc, out = _run(backend, train_overrides(run, **changed))
    assert rc != 0 and "optimizer hyper-parameters differ from the checkpoint (" in out, out[-3000:]
    assert "lam 0.1 -> 0.5" in out and "checkpoint.allow_changes=[optimizer_hparams]" in out
    assert not (run / "step-4").exists()
    rc, out = _run(backend, train_overrides(run, **changed, **{"checkpoint.allow_changes": "[optimizer_hparams]"}))
    assert rc == 0 and "optimizer lam: 0.1 -> 0.5 (allowed)" in out, out[-3000:]


def _rng_worker(rank: int, world: int, port: int, tmp: str) -> None:
    from amllm import checkpoint as ckpt

    torch.manual_seed(100 + rank)  # each rank its own stream, as after rank-dependent draws
    torch.rand(3)
    ckpt.save_rng(Path(tmp), rank, torch.device("cpu"))
    expect = torch.rand(5)
    torch.manual_seed(0)  # what a restart would do on every rank
    ckpt.restore_rng(Path(tmp), rank, torch.device("cpu"), {"rng_cpu": torch.get_rng_state()})
    torch.save({"expect": expect, "got": torch.rand(5)}, Path(tmp) / f"out{rank}.pt")


def test_every_rank_gets_its_own_rng_state_back(tmp_path):
    mp.spawn(_rng_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    out = [torch.load(tmp_path / f"out{r}.pt") for r in (0, 1)]
    assert all(torch.equal(o["expect"], o["got"]) for o in out)
    assert not torch.equal(out[0]["got"], out[1]["got"])  # rank 1 did not get rank 0's stream
