"""Resume checks that hold on every backend: any checkpoint continues on any backend and world size,
changed optimizer hyper-parameters, per-rank RNG states.

Cross-backend resume (through the real launchers, 2 CPU ranks, or one process): a run stopped at step 3 by one backend
and finished by another matches an uninterrupted single-process run, in loss and β (per-layer, at a
learning rate where β leaves β_max), on the steps after the resume -- to float32 rounding, since the
backends sum in different orders. Before the one checkpointer, each of these was refused.

The hyper-parameters a run was saved with travel in trainer.pt (``optim_hparams``), so the check does
not depend on the backend's optimizer-state layout (DDP's optimizer.pt, FSDP2's DCP shards,
DeepSpeed's per-rank files): a changed λ or weight decay is refused on every backend, and applied on
every backend with ``checkpoint.allow_changes=[optimizer_hparams]``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, free_port

from amllm.metrics import read_metrics
from amllm.parallel.full_state import read_full
from tests.dist_cases import cli_env, train_cli


def _run(backend: str, over: list[str], n: int = 2, **env: str) -> tuple[int, str]:
    """train.py with ``over`` on ``n`` ranks: the deepspeed launcher, torchrun, or (n=1) a plain process."""
    cmd = [sys.executable, "train.py"] if n == 1 else train_cli("deepspeed" if backend == "deepspeed" else "torchrun", n)
    p = subprocess.run(cmd + over, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


# ---- any checkpoint on any backend and world size ------------------------------------------------------

BETA_MOVES = {"optim.lr": 0.1, "schedule.warmup_steps": 0, "optim.per_layer": True,  # β leaves β_max here
              "train.max_steps": 6, "checkpoint.every": 3, "log.every": 1, "eval.every": 0}


def _ds(stage: int) -> dict:
    return {"parallel.backend": "deepspeed", "parallel.deepspeed_config": f"configs/deepspeed/zero{stage}_fp32.json"}


CROSS = {  # name: (backend, ranks, overrides) of the first part, then of the second
    "zero2x2-to-1process": (("deepspeed", 2, _ds(2)), ("ddp", 1, {})),
    "zero2x2-to-fsdp2x2": (("deepspeed", 2, _ds(2)), ("fsdp2", 2, {"parallel.backend": "fsdp2"})),
    "fsdp2x2-to-zero3x2": (("fsdp2", 2, {"parallel.backend": "fsdp2"}), ("deepspeed", 2, _ds(3))),
    "ddp1-to-zero1x2": (("ddp", 1, {}), ("deepspeed", 2, _ds(1))),
    "zero2x2-to-zero2x1": (("deepspeed", 2, _ds(2)), ("deepspeed", 1, _ds(2))),  # DeepSpeed itself, N -> M
}


def _train_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run, "train")}


@pytest.fixture(scope="module")
def uninterrupted(micro_model, data_dir, tmp_path_factory) -> dict[int, dict]:
    """The reference: the same 6 steps in one process, never stopped."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    rc, out = _run("ddp", _overrides(micro_model, data_dir, run), n=1)
    assert rc == 0, out[-3000:]
    return _train_records(run)


def _overrides(micro_model, data_dir, run: Path, **extra) -> list[str]:
    base = {"run_dir": str(run), "model.name": micro_model, "data.data_dir": data_dir, "data.seq_len": 64,
            "train.batch_size": 4, "train.micro_batch_size": 2, "log.progress": False, "train.threads": 1,
            **BETA_MOVES, **extra}
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("case", list(CROSS))
def test_a_checkpoint_resumes_on_another_backend_and_world_size(case, uninterrupted, micro_model, data_dir, tmp_path):
    pytest.importorskip("deepspeed")
    (b1, n1, over1), (b2, n2, over2) = CROSS[case]
    run = tmp_path / "run"
    rc, out = _run(b1, _overrides(micro_model, data_dir, run, **over1), n=n1, AMLLM_TEST_STOP_AT_STEP="3")
    assert (run / "step-3" / "meta.json").is_file() and not (run / "step-6").exists(), out[-3000:]
    rc, out = _run(b2, _overrides(micro_model, data_dir, run, **over2), n=n2)
    assert rc == 0, out[-3000:]
    assert "loading it whole per parameter" in out and "resumed from" in out and "step 3" in out, out[-3000:]
    got = _train_records(run)
    for step in (4, 5, 6):
        ref, res = uninterrupted[step], got[step]
        assert res["loss"] == pytest.approx(ref["loss"], rel=2e-5, abs=0), (step, res["loss"], ref["loss"])
        for key in ("beta", "beta_min", "beta_max"):
            assert res[key] == pytest.approx(ref[key], abs=1e-4), (step, key, res[key], ref[key])
    assert min(uninterrupted[s]["beta_min"] for s in (4, 5, 6)) < 0.85  # β moved: the check has teeth
    assert (run / "step-6" / "meta.json").is_file()
    for step_dir in (run / "step-3", run / "step-6"):  # ZeRO-2 / ZeRO-3 files: the AM layout's weights are
        if (step_dir / "deepspeed").is_dir():          # DeepSpeed's own zero_to_fp32 merge, bit for bit
            from deepspeed.utils.zero_to_fp32 import (
                get_fp32_state_dict_from_zero_checkpoint,
            )

            theirs = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="deepspeed")
            ours = read_full(step_dir)["model"]
            assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k].float()) for k in theirs)


# ---- another optimizer on every backend ------------------------------------------------------------------

ANOTHER = {"ddp": ("ddp", {}), "fsdp2": ("fsdp2", {"parallel.backend": "fsdp2"}),
           "deepspeed": ("deepspeed", _ds(2))}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", pytest.param("deepspeed", marks=pytest.mark.deepspeed)])
def test_another_optimizer_is_refused_then_starts_fresh_from_the_weights(backend, uninterrupted, micro_model, data_dir,
                                                                          tmp_path):
    """An am_adamw checkpoint resumed with optim.name=adamw on 2 ranks: refused in one line, then with
    checkpoint.allow_changes=[optimizer] the weights load and AdamW starts fresh -- the loss of step 4
    (computed before its update, on the step-3 weights) is the uninterrupted AM-AdamW run's. Before, FSDP2
    died on the optimizer state's missing keys (amsgrad) and DeepSpeed ZeRO-2 with a KeyError."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    name, over = ANOTHER[backend]
    run = tmp_path / "run"
    rc, out = _run(name, _overrides(micro_model, data_dir, run, **over), AMLLM_TEST_STOP_AT_STEP="3")
    assert (run / "step-3" / "meta.json").is_file(), out[-3000:]
    adamw = {**over, "optim.name": "adamw", "optim.per_layer": False}
    rc, out = _run(name, _overrides(micro_model, data_dir, run, **adamw))
    assert rc != 0 and "saved with optimizer 'am_adamw', this run has 'adamw'" in out, out[-3000:]
    assert "checkpoint.allow_changes=[optimizer]" in out and not (run / "step-6").exists()
    rc, out = _run(name, _overrides(micro_model, data_dir, run, **adamw, **{"checkpoint.allow_changes": "[optimizer]"}))
    assert rc == 0 and "optimizer state starts fresh" in out, out[-3000:]
    got = _train_records(run)
    assert got[4]["loss"] == pytest.approx(uninterrupted[4]["loss"], rel=2e-5, abs=0), (got[4], uninterrupted[4])
    assert got[6]["beta"] is None and (run / "step-6" / "meta.json").is_file()  # AdamW trained on: no β


# ---- hyper-parameters and RNG on every backend ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", pytest.param("deepspeed", marks=pytest.mark.deepspeed)])
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
