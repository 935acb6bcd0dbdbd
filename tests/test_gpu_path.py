"""The GPU path's step bookkeeping, proven on CPU: no host read in a quiet step, device-side skips.

A "quiet" step neither logs, evaluates, saves nor checks the guard's flags. On a GPU any host read in
it (``.item()``, ``bool(t)``, ``.tolist()``, a copy to the host) stalls the CPU until the GPU queue
drains; here ``train.sync_debug=true`` runs quiet steps under ``amllm.debug.HostReads(strict=True)``,
which raises at the first such read (on CUDA it sets torch's sync debug mode to "error" instead).
The AM optimizers run their accelerator path (the Triton kernels, interpreted on CPU with
``TRITON_INTERPRET=1``); torch's AdamW runs fused (it honours ``found_inf`` on the device).

Non-finite steps: the update is skipped on the device (``optimizer.found_inf``, and the AM
optimizers' own check of their all-reduced statistics), so NaN gradients are caught before the
update under DeepSpeed too, where the engine measures the norm inside its own step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from amllm import fault_injection, guard  # noqa: E402
from amllm.debug import HostReadError, HostReads  # noqa: E402
from amllm.optim import _triton  # noqa: E402
from tests.dist_cases import cli_env, train_cli  # noqa: E402

TRITON = {"TRITON_INTERPRET": "1"}


def quiet(train_overrides, run: Path, steps: int = 8, every: int = 4, **extra) -> list[str]:
    """A run whose steps 3..every-1, every+1.. are quiet (log/check every `every` steps, no eval or
    checkpoint cadence: only the final step saves)."""
    return train_overrides(run, **{"train.max_steps": steps, "log.every": every, "train.check_every": every,
                                   "eval.every": 0, "checkpoint.every": 0, "train.sync_debug": "true", **extra})


def run_cli(cmd: list[str], env_extra: dict | None = None, timeout: int = 600) -> tuple[int, str]:
    p = subprocess.run(cmd, cwd=ROOT, env=cli_env(**(env_extra or {})), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


# ---- the counter itself can fail -------------------------------------------------------------------

def test_host_read_counter_sees_every_kind_of_read():
    t = torch.arange(4.0)
    with HostReads() as reads:
        (t * 2).add_(1).sum()
    assert reads.count == 0
    with HostReads() as reads:
        t.sum().item()
        bool(t[0] > 0)
        float(t[1])
        t.tolist()
        t.numpy()
    assert reads.count == 5, reads.where
    with pytest.raises(HostReadError, match=r"host sync .* tests/test_gpu_path.py:\d+"):
        with HostReads(strict=True):
            t.max().item()


def test_host_sync_counter_sees_every_class_cuda_refuses():
    """Each class of amllm.fault_injection.PLANTED_SYNCS counts once (copies on the meta device: on a
    CPU-only machine there is no other), and a device-side equivalent of each counts nothing."""
    from amllm.fault_injection import PLANTED_SYNCS

    t = torch.arange(-2.0, 4.0, requires_grad=True) * 1.0
    for name, sync in PLANTED_SYNCS.items():
        with HostReads() as reads:
            try:
                sync(t)
            except (RuntimeError, NotImplementedError):
                pass  # the meta copies cannot run; they were counted first
        assert reads.count == 1, (name, reads.where)
    with HostReads() as reads:  # what quiet steps do instead: all on the device, nothing waits
        mask = t > 0
        torch.where(mask, t, torch.zeros_like(t)).sum()
        torch.ones(2).to("meta", non_blocking=True)
        torch.nonzero_static(t.detach(), size=6)
    assert reads.count == 0, reads.where


def test_planted_item_in_a_quiet_step_fails(train_overrides, tmp_path, monkeypatch):
    """The trainer-level check is not blind: one `.item()` on the loss of a quiet step stops the run."""
    def install_a_sync(model, sampler, rank, run_dir):
        def planted_sync(module, args, loss):
            loss.item()  # planted

        model.register_forward_hook(planted_sync)

    monkeypatch.setattr(fault_injection, "install", install_a_sync)
    with pytest.raises(HostReadError, match=r"planted_sync"):
        train.main(quiet(train_overrides, tmp_path / "run", **{"optim.name": "adamw", "optim.impl": "fused"}))


# ---- zero host reads in quiet steps, on every backend ------------------------------------------------

PLANT_ON = {"ddp": ([sys.executable, "train.py"], {}),
            "fsdp2": (None, {"parallel.backend": "fsdp2"}),
            "deepspeed": (None, {"parallel.backend": "deepspeed",
                                 "parallel.deepspeed_config": "configs/deepspeed/zero2_fp32.json"})}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", pytest.param("deepspeed", marks=pytest.mark.deepspeed)])
def test_every_planted_sync_class_is_refused_on_every_backend(train_overrides, tmp_path, backend):
    """train.sync_debug=true on each backend (1 process for DDP, 2 ranks through torchrun / deepspeed for
    the sharded ones): in a quiet step one planted sync of every class (AMLLM_TEST_PLANT_SYNCS) is refused
    on every rank; the run itself goes on (the planted calls are caught by the planting hook)."""
    from amllm.fault_injection import PLANTED_SYNCS

    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    cmd, over = PLANT_ON[backend]
    cmd = cmd or train_cli("torchrun" if backend == "fsdp2" else "deepspeed", 2)
    run = tmp_path / "run"
    # the accelerator path (Triton kernels, interpreted): the CPU kernels read CPU values, which is no sync
    rc, out = run_cli(cmd + quiet(train_overrides, run, **over, **{"optim.impl": "triton"}),
                      {"AMLLM_TEST_PLANT_SYNCS": "3", **TRITON})
    assert rc == 0, out[-3000:]
    ranks = sorted(run.glob("planted-syncs-rank*.json"))
    assert len(ranks) == (1 if backend == "ddp" else 2), out[-3000:]
    for f in ranks:
        refused = json.loads(f.read_text())
        assert refused == {name: True for name in PLANTED_SYNCS}, (f.name, refused)

def test_quiet_steps_make_no_host_read_one_process(train_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for optim in ({"optim.name": "adamw", "optim.impl": "fused"},
                  {"optim.name": "am_adamw", "optim.impl": "triton"},
                  {"optim.name": "am_adamw", "optim.impl": "triton", "optim.per_layer": "true",
                   "train.nonfinite": "skip"},
                  {"optim.name": "am_sgd", "optim.impl": "triton", "optim.lr": 0.05}):
        run = tmp_path / "_".join(f"{v}" for v in optim.values())
        launches = _triton.launches
        assert train.main(quiet(train_overrides, run, **optim)) == 0, optim
        if optim["optim.impl"] == "triton":  # the kernels ran (no silent fallback to foreach)
            assert _triton.launches >= launches + 3 * 7, optim  # AM-SGD: no sums on its first step


def test_beta_terms_make_no_host_read_on_quiet_steps(train_overrides, tmp_path, monkeypatch):
    """optim.beta_terms computes its sums on every step but reads them only on logging steps: quiet
    steps under sync_debug stay free of host reads, and the logged lines carry the terms. (Triton: the
    foreach path reads its skip flag on the host, with or without the terms.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for extra in ({}, {"optim.per_layer": "block"}):
        run = tmp_path / f"terms{len(extra)}"
        over = quiet(train_overrides, run, **{"optim.name": "am_adamw", "optim.impl": "triton",
                                              "optim.beta_terms": "true", **extra})
        assert train.main(over) == 0, extra
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in lines if r.get("kind") == "train"]
        assert [r["step"] for r in logged] == [4, 8]
        key = "betas_dg" if extra else "beta_dg"
        assert all(r[key] is not None for r in logged), (extra, logged[-1])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_quiet_steps_make_no_host_read_two_ranks(train_overrides, tmp_path, backend):
    over = quiet(train_overrides, tmp_path / "run", **{"parallel.backend": backend, "optim.impl": "triton",
                                                        "train.micro_batch_size": 1})
    rc, out = run_cli(train_cli("torchrun", 2) + over, TRITON)
    assert rc == 0, out[-3000:]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_quiet_steps_make_no_host_read_deepspeed_zero2(train_overrides, tmp_path):
    """DeepSpeed's own per-step norm check (`is_invalid_grad_norm`, a host read) is replaced by the AM
    optimizer's device-side skip; bf16 as on a GPU."""
    pytest.importorskip("deepspeed")
    over = quiet(train_overrides, tmp_path / "run", **{
        "parallel.backend": "deepspeed", "parallel.deepspeed_config": "configs/deepspeed/zero2_bf16.json",
        "train.precision": "bf16", "optim.impl": "triton", "train.micro_batch_size": 1})
    rc, out = run_cli(train_cli("deepspeed", 2) + over, TRITON)
    assert rc == 0, out[-3000:]


# ---- stop requests: honoured within check_every steps ------------------------------------------------

def test_stop_request_is_honoured_at_the_next_check(train_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("AMLLM_TEST_STOP_AT_STEP", "5")
    run = tmp_path / "run"
    over = train_overrides(run, **{"train.max_steps": 12, "log.every": 100, "train.check_every": 4,
                                   "eval.every": 0, "checkpoint.every": 0})
    assert train.main(over) == train.PREEMPTED_EXIT
    assert [p.name for p in run.glob("step-*")] == ["step-8"]  # requested at 5, checked at 8


def test_stop_on_a_cadence_save_saves_once_and_exits(train_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("AMLLM_TEST_STOP_AT_STEP", "4")
    run = tmp_path / "run"
    over = train_overrides(run, **{"train.max_steps": 12, "checkpoint.every": 4, "eval.every": 0})
    assert train.main(over) == train.PREEMPTED_EXIT
    assert sorted(p.name for p in run.glob("step-*")) == ["step-4"]


# ---- the guard's accumulators ------------------------------------------------------------------------

def test_guard_reports_the_first_bad_step_and_counts_skips(capsys):
    g = guard.NonFiniteGuard("skip", torch.device("cpu"), skipped=2, first_step=10)
    ok, bad_loss = torch.tensor(0.0), torch.tensor(float("nan"))
    for loss, skipped in ((ok, 0.0), (bad_loss, 1.0), (ok, 1.0), (ok, 0.0)):  # steps 11..14
        flags = g.observe(loss, torch.tensor(1.0))
        g.record(flags, torch.tensor(skipped))
    g.check(14)
    out = capsys.readouterr().out
    assert "step 12: non-finite loss; update skipped (4 so far, and 1 more up to step 14)" in out
    assert g.skipped == 4 and not g.stop_requested
    g.check(15)  # nothing new since the last check
    assert capsys.readouterr().out == "" and g.skipped == 4
    stop = guard.NonFiniteGuard("stop", torch.device("cpu"), first_step=0)
    g_flags = stop.observe(ok, torch.tensor(float("inf")), stop=True)
    stop.record(g_flags, torch.tensor(1.0))
    with pytest.raises(guard.NonFiniteError, match=r"^step 1: non-finite gradient norm; stopped without saving"):
        stop.check(1)
    assert stop.stop_requested


# ---- non-finite gradients (finite loss) are skipped on the device ------------------------------------

def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _model_at(run: Path, step: int) -> dict:
    from amllm.parallel.full_state import full_model_state

    return full_model_state(run / f"step-{step}")


@pytest.mark.parametrize("optim", ["am_adamw", "adamw"])
def test_nan_gradients_skip_the_update_one_process(train_overrides, tmp_path, monkeypatch, optim):
    monkeypatch.setenv("AMLLM_TEST_NAN_GRAD_AT_STEP", "3")
    run = tmp_path / "run"
    over = train_overrides(run, **{"train.max_steps": 4, "checkpoint.every": 1, "checkpoint.keep": 10,
                                   "train.nonfinite": "skip", "optim.name": optim, "optim.impl": "fused"})
    assert train.main(over) == 0
    assert _weights_equal(_model_at(run, 2), _model_at(run, 3))
    assert not _weights_equal(_model_at(run, 3), _model_at(run, 4))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_nan_gradients_under_deepspeed_are_caught_before_the_update(train_overrides, tmp_path):
    """Fails on the old code: skip was refused under DeepSpeed, and the guard saw a zero placeholder
    norm, so NaN gradients (finite loss) reached the weights."""
    pytest.importorskip("deepspeed")
    common = {"parallel.backend": "deepspeed", "parallel.deepspeed_config": "configs/deepspeed/zero2_fp32.json",
              "train.micro_batch_size": 1, "train.max_steps": 4, "checkpoint.every": 1, "checkpoint.keep": 10,
              "eval.every": 0}
    env = {"AMLLM_TEST_NAN_GRAD_AT_STEP": "3", "AMLLM_TEST_NAN_RANK": "1"}
    skip = tmp_path / "skip"
    rc, out = run_cli(train_cli("deepspeed", 2) + train_overrides(skip, **common, **{"train.nonfinite": "skip"}), env)
    assert rc == 0, out[-3000:]
    assert "step 3: non-finite gradient norm; update skipped (1 so far)" in out
    assert _weights_equal(_model_at(skip, 2), _model_at(skip, 3))
    assert not _weights_equal(_model_at(skip, 3), _model_at(skip, 4))
    stop = tmp_path / "stop"
    rc, out = run_cli(train_cli("deepspeed", 2) + train_overrides(stop, **common), env)
    assert rc == train.NONFINITE_EXIT, out[-3000:]
    assert "error: step 3: non-finite gradient norm; stopped without saving" in out
    assert sorted(p.name for p in stop.glob("step-*")) == ["step-1", "step-2"]


# ---- what runs on an accelerator by default (device branches forced without one) ---------------------

def test_accelerator_defaults_skip_on_the_device():
    """On CUDA, optim.impl=auto gives torch's fused AdamW/SGD (they take found_inf) and the AM optimizers'
    fused path (the Triton kernels) whatever the model size; the CPU keeps its size threshold."""
    from amllm.config import OptimConfig
    from amllm.optim import AMAdamW
    from amllm.optim_factory import _impl_kwargs

    cuda = torch.device("cuda")
    assert _impl_kwargs(OptimConfig(name="adamw"), cuda) == {"fused": True}
    assert _impl_kwargs(OptimConfig(name="sgd"), cuda) == {"fused": True}
    assert _impl_kwargs(OptimConfig(name="adamw"), torch.device("cpu")) == {}
    small_cpu = AMAdamW([torch.nn.Parameter(torch.zeros(8))])
    small_meta = AMAdamW([torch.nn.Parameter(torch.zeros(8, device="meta"))])  # stands in for a GPU tensor
    assert small_cpu._resolved_impl() == "foreach" and small_meta._resolved_impl() == "fused"


def test_count_mode_counts_our_syncs_instead_of_refusing(monkeypatch):
    """AMLLM_SYNC_DEBUG=count (tools/bench_ds_syncs.py): the strict counter records our syncs for the
    end-of-run report instead of raising; without it the same read raises."""
    from amllm import debug

    monkeypatch.setattr(debug, "OUR_SYNCS", debug.collections.Counter())
    x = torch.ones(3)
    with pytest.raises(debug.HostReadError, match="host sync"):
        with debug.HostReads(strict=True):
            x.sum().item()
    monkeypatch.setenv("AMLLM_SYNC_DEBUG", "count")
    with debug.HostReads(strict=True) as reads:
        x.sum().item()
        x.tolist()
    assert reads.count == 2 and sum(debug.OUR_SYNCS.values()) == 2
    assert "our host syncs in quiet steps (AMLLM_SYNC_DEBUG=count): 2" in debug.sync_report()
