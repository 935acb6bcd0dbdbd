"""Fault injection for the tests: environment variables that make a run fail on purpose.

None is read unless set, and none changes a normal run: :func:`install` wires the ones that are set
into a run once, outside the training loop (a forward hook on the model, a wrapper on the sampler),
so the loop carries no test code. docs/faults.md says which test uses which.

    AMLLM_TEST_NAN_AT_STEP=N      the loss of optimizer step N (1-based, as logged) is multiplied by NaN
    AMLLM_TEST_NAN_GRAD_AT_STEP=N the loss of step N stays finite, its gradients are NaN
    AMLLM_TEST_NAN_RANK=R         ... (either) on rank R only (default: every rank)
    AMLLM_TEST_CRASH_AT_STEP=N    os._exit(1) at the start of step N, once per run directory
    AMLLM_TEST_CRASH_RANK=R       ... on rank R only (default 0); the marker <run_dir>/.crashed-step-N
                                  keeps the restarted attempt from crashing again
    AMLLM_TEST_STOP_AT_STEP=N     a stop request (as SIGTERM) after step N
    AMLLM_TEST_SAVE_PAUSE=phase@N hold a save at a phase (SAVE_PHASES) for kill -9 tests
    AMLLM_TEST_SAVE_PAUSE_S=S     ... for S seconds (default 600)
    AMLLM_TEST_SAVE_SLEEP=S       sleep S seconds before a save's files are fsynced (kill -9 window)
    AMLLM_TEST_PLANT_SYNCS=N      at step N's forward (a quiet step with train.sync_debug=true), try one
                                  host sync of every class amllm.debug knows; each must be refused. Which
                                  were is written to <run_dir>/planted-syncs-rank<r>.json
    AMLLM_TEST_STEP_SLEEP=S       sleep S seconds at the start of every step (slow steps, so that a signal
                                  or a killed host lands mid-run: tests/test_multinode.py)
    AMLLM_TEST_ENV_REPORT=A,B,..  each rank writes those environment variables (and its host name) to
                                  <run_dir>/env-rank<r>.json: what a launcher carried to a remote host
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

SAVE_PHASES = ("begin", "written", "before-meta", "before-rename", "renamed")
"""Points of a save, in order, where the AMLLM_TEST_SAVE_PAUSE hook can hold the process (kill -9 tests):
begin (empty .tmp dir), written (write_fn done, nothing fsynced), before-meta (files fsynced, no
meta.json), before-rename (meta.json written), renamed (step-N/ in place, not yet pruned). Writers add
their own points through :func:`save_pause` (the checkpointer pauses after the backend's files:
``after-model.pt``)."""


def install(model: torch.nn.Module, sampler, rank: int, run_dir: Path) -> None:
    """Wire the hooks the environment asks for into this run; nothing when none is set. Step numbers
    are the sampler's (its position after drawing step N's batch is N)."""
    if any(os.environ.get(k) for k in ("AMLLM_TEST_NAN_AT_STEP", "AMLLM_TEST_NAN_GRAD_AT_STEP")):
        def poison(module, args, out):  # the training loss only (evaluation returns logits / outputs)
            return poison_loss(out, sampler.step, rank) if module.training and torch.is_tensor(out) else None

        model.register_forward_hook(poison)
    if os.environ.get("AMLLM_TEST_CRASH_AT_STEP") or os.environ.get("AMLLM_TEST_STEP_SLEEP"):
        draw = sampler.next_batch
        pause = float(os.environ.get("AMLLM_TEST_STEP_SLEEP") or 0)

        def next_batch():
            batch = draw()
            crash_hook(sampler.step, rank, run_dir)
            time.sleep(pause)
            return batch

        sampler.next_batch = next_batch
    if os.environ.get("AMLLM_TEST_ENV_REPORT"):
        names = [n.strip() for n in os.environ["AMLLM_TEST_ENV_REPORT"].split(",") if n.strip()]
        report = {"hostname": socket.gethostname(), **{n: os.environ.get(n) for n in names}}
        (Path(run_dir) / f"env-rank{rank}.json").write_text(json.dumps(report))
    if os.environ.get("AMLLM_TEST_PLANT_SYNCS"):
        at = int(os.environ["AMLLM_TEST_PLANT_SYNCS"])

        def plant(module, args, out):
            if module.training and sampler.step == at:
                plant_syncs(out, Path(run_dir) / f"planted-syncs-rank{rank}.json")

        model.register_forward_hook(plant)


#: One planted instance of every class of host sync amllm.debug refuses. The copies use the ``meta``
#: device: a CPU-only run has no second device, and the check refuses the copy before it runs.
PLANTED_SYNCS = {
    "read": lambda t: t.sum().item(),
    "tolist": lambda t: t.detach().tolist(),
    "numpy": lambda t: t.detach().cpu().numpy() if t.device.type == "cpu" else None,
    "device->host": lambda t: torch.empty(2, device="meta").to("cpu"),
    "host->device": lambda t: torch.ones(2).to("meta"),
    "synchronize": lambda t: torch.cuda.synchronize(),
    "nonzero": lambda t: torch.nonzero(t.detach().reshape(-1)),
    "boolean mask": lambda t: t.detach().reshape(-1)[t.detach().reshape(-1) > 0],
    "unique": lambda t: torch.unique(t.detach()),
}


def plant_syncs(t: torch.Tensor, out: Path) -> None:
    """Try every planted sync inside the current (checked) step; record which were refused."""
    from .debug import HostReadError

    refused = {}
    for name, sync in PLANTED_SYNCS.items():
        try:
            sync(t)
            refused[name] = False
        except HostReadError:
            refused[name] = True
    out.write_text(json.dumps(refused))


def stop_at_step() -> int:
    """AMLLM_TEST_STOP_AT_STEP: the step after which a stop is requested (0: never)."""
    return int(os.environ.get("AMLLM_TEST_STOP_AT_STEP", "0"))


def save_pause(phase: str, run_dir: Path, step: int) -> None:
    """With AMLLM_TEST_SAVE_PAUSE=<phase>@<step> (or <phase>): touch ``<run_dir>/.paused-<phase>-<step>``
    and sleep, so a test can SIGKILL the process right there."""
    want = os.environ.get("AMLLM_TEST_SAVE_PAUSE")
    if not want:
        return
    name, _, at = want.partition("@")
    if name == phase and (not at or int(at) == step):
        (Path(run_dir) / f".paused-{phase}-{step}").touch()
        time.sleep(float(os.environ.get("AMLLM_TEST_SAVE_PAUSE_S", "600")))


def save_sleep() -> None:
    """AMLLM_TEST_SAVE_SLEEP=S: widen the window before a save's fsync for kill -9 tests."""
    hook = os.environ.get("AMLLM_TEST_SAVE_SLEEP")
    if hook:
        time.sleep(float(hook))


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are NaN (what an overflow in the
    backward pass looks like)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Test hooks, on rank AMLLM_TEST_NAN_RANK (default: every rank): AMLLM_TEST_NAN_AT_STEP=N makes
    step N's loss NaN (and so its gradients); AMLLM_TEST_NAN_GRAD_AT_STEP=N keeps the loss finite and
    makes only the gradients NaN."""
    if int(os.environ.get("AMLLM_TEST_NAN_RANK", rank)) != rank:
        return loss
    if os.environ.get("AMLLM_TEST_NAN_AT_STEP") == str(step):
        return loss * float("nan")
    if os.environ.get("AMLLM_TEST_NAN_GRAD_AT_STEP") == str(step):
        return _NaNGrad.apply(loss)
    return loss


def crash_hook(step: int, rank: int, run_dir: Path) -> None:
    """Test hook AMLLM_TEST_CRASH_AT_STEP / AMLLM_TEST_CRASH_RANK: die like a lost node, once."""
    at = os.environ.get("AMLLM_TEST_CRASH_AT_STEP")
    if not at or int(at) != step or int(os.environ.get("AMLLM_TEST_CRASH_RANK", "0")) != rank:
        return
    marker = Path(run_dir) / f".crashed-step-{step}"
    if marker.exists():
        return
    marker.touch()
    print(f"[test] rank {rank} crashing at step {step} (AMLLM_TEST_CRASH_AT_STEP)", flush=True)
    os._exit(1)
