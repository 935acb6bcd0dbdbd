"""What train.py does when something goes wrong: non-finite steps, output-directory checks, test hooks.

Kept out of train.py so the loop stays readable; each helper is one line there. docs/faults.md lists
every failure, what it costs and which test shows it.

Test hooks (environment variables; none is read unless set, none changes a normal run):

    AMLLM_TEST_NAN_AT_STEP=N      the loss of optimizer step N (1-based, as logged) is multiplied by NaN
    AMLLM_TEST_NAN_GRAD_AT_STEP=N the loss of step N stays finite, its gradients are NaN
    AMLLM_TEST_NAN_RANK=R         ... (either) on rank R only (default: every rank)
    AMLLM_TEST_CRASH_AT_STEP=N    os._exit(1) at the start of step N, once per run directory
    AMLLM_TEST_CRASH_RANK=R       ... on rank R only (default 0); the marker <run_dir>/.crashed-step-N
                                  keeps the restarted attempt from crashing again
    AMLLM_TEST_SAVE_PAUSE=phase@N hold a save at a phase (amllm.checkpoint.SAVE_PHASES) for kill -9 tests
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from .config import Config, ConfigError, load_config, save_config
from .parallel import distributed as D


def is_main_rank() -> bool:
    return not D.is_dist() or torch.distributed.get_rank() == 0


def say(line: str) -> None:
    """print on rank 0 only."""
    if is_main_rank():
        print(line, flush=True)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm with train.nonfinite=stop (one line, names the step)."""


# ---- non-finite loss / gradient ------------------------------------------------------------------

class NonFiniteGuard:
    """Non-finite steps and stop requests, decided on the device and read on the host only at checks.

    Per step (:meth:`observe`, no host read): this rank's flags -- non-finite loss, non-finite gradient
    norm, a stop request (SIGTERM/SIGINT) -- are packed into one tensor and MAX-reduced once over all
    ranks: the one collective of a step's bookkeeping. Their OR, ``found_inf``, goes to the optimizer
    (the GradScaler protocol: ``optimizer.found_inf``), which skips its whole update on the device; the
    AM optimizers also skip when their all-reduced statistics are non-finite (``skip_nonfinite``: a NaN
    gradient on any rank, also under DeepSpeed, where the norm is only known inside the engine).
    :meth:`record` folds what happened into device accumulators (skipped steps since the last check,
    the first bad step and why, the agreed stop request).

    At a check (:meth:`check`: logged, evaluated and saved steps, and every ``train.check_every``
    steps; every rank at the same steps) one host read of the accumulators: skip mode prints what was
    skipped, stop mode raises :class:`NonFiniteError` naming the first bad step, and
    ``stop_requested`` becomes the agreed stop request. Guarantees: with an optimizer that takes
    ``found_inf`` (AM-AdamW / AM-SGD, torch's fused AdamW/SGD) a non-finite step never reaches the
    weights in either mode; with any optimizer nothing non-finite reaches a checkpoint (a save is
    always preceded by a check, and checks the state itself); a stop request or a non-finite step is
    acted on within ``check_every`` steps. Optimizers without ``found_inf`` under skip mode cost one
    host read per step (see :meth:`needs_host_decision`).
    """

    def __init__(self, mode: str, device: torch.device, skipped: int = 0, first_step: int = 0):
        self.mode, self.device, self.skipped = mode, device, int(skipped)
        self.stop_requested = False
        self._first_step = first_step  # step numbers on the device count from here (no host->device copy)
        self._const = torch.tensor([0.0, 1.0], device=device)  # the stop flag picks one: no copy per step
        self._n = torch.zeros((), device=device)  # steps observed
        # skipped since the last check, first bad step (0: none), its loss flag, its gradient flag, stop
        self._acc = torch.zeros(5, device=device)

    def observe(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None, stop: bool = False) -> torch.Tensor:
        """One step's flags, agreed by all ranks; returns ``flags`` = [loss bad, grad bad, stop] (device)."""
        norm_bad = (self._const[0] if grad_norm is None else
                    (~torch.isfinite(grad_norm.detach().float())).float().to(self.device))
        flags = torch.stack([(~torch.isfinite(loss_sum.detach().float())).float(), norm_bad,
                             self._const[1 if stop else 0]])
        if D.is_dist():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        self._n.add_(1)
        return flags

    @staticmethod
    def found_inf(flags: torch.Tensor) -> torch.Tensor:
        """0-d float: 1.0 when the step must not be applied."""
        return flags[:2].amax()

    def needs_host_decision(self, optimizer) -> bool:
        """Skip mode with an optimizer that cannot skip on the device: the step is decided on the host."""
        return self.mode == "skip" and not takes_found_inf(optimizer)

    def record(self, flags: torch.Tensor, skipped: torch.Tensor) -> None:
        """Fold a step into the accumulators. ``skipped``: 0-d, whether the update was skipped (it can
        be set with finite flags: an AM optimizer saw non-finite statistics, i.e. a bad gradient)."""
        skipped = skipped.detach().float().to(self.device)
        bad = torch.maximum(self.found_inf(flags), skipped)
        first = (self._acc[1] == 0) & (bad > 0)
        grad_bad = torch.maximum(flags[1], skipped * (flags[0] == 0))  # a skip not caused by the loss
        now = torch.stack([self._acc[0] + skipped, self._n + self._first_step, flags[0], grad_bad,
                           torch.maximum(self._acc[4], flags[2])])
        keep = torch.stack([now[0], self._acc[1], self._acc[2], self._acc[3], now[4]])
        self._acc.copy_(torch.where(torch.stack([self._const[1] > 0, first, first, first, self._const[1] > 0]),
                                    now, keep))

    def check(self, step: int) -> None:
        """The host read: act on what the device saw since the last check (see the class docstring)."""
        n_skipped, first, loss_bad, grad_bad, stop = self._acc.tolist()
        self._acc[:4].zero_()
        self.stop_requested = bool(stop)
        if not first:
            return
        what = " and ".join(w for w, b in (("loss", loss_bad), ("gradient norm", grad_bad)) if b) or "gradient norm"
        first = int(first)
        if self.mode == "stop":
            raise NonFiniteError(f"step {first}: non-finite {what}; stopped without saving (train.nonfinite=stop), "
                                 f"the last checkpoint is intact; lower optim.lr, or resume with "
                                 f"train.nonfinite=skip to skip such batches")
        n = int(n_skipped)
        self.skipped += n
        more = f", and {n - 1} more up to step {step}" if n > 1 else ""
        say(f"warning: step {first}: non-finite {what}; update skipped ({self.skipped} so far{more})")


def takes_found_inf(optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``optimizer.found_inf`` on the device: the AM optimizers
    (``skip_nonfinite`` protocol) and torch's fused optimizers (the ones GradScaler drives that way)."""
    return hasattr(optimizer, "last_skipped") or bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def check_finite_state(state: dict, what: str, step: int) -> None:
    """Refuse to save a state dict holding NaN/inf (a checkpoint must never carry them)."""
    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                raise NonFiniteError(f"refusing to save step-{step}: {what} {name} holds non-finite values; "
                                     f"the last checkpoint is intact (see train.nonfinite)")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")
    walk(state, "")


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


# ---- the output directory ------------------------------------------------------------------------

def check_output_dir(run_dir: Path) -> None:
    """Before any work: the run directory (or the nearest existing parent that would hold it) must be
    a writable directory. Writes nothing."""
    p = Path(run_dir).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"run_dir={str(run_dir)!r}: {p} is not a directory; choose another run_dir")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir={str(run_dir)!r} is not writable ({p}); choose another run_dir or fix permissions")


def checkpoint_bytes(model: torch.nn.Module, optimizer_name: str) -> int:
    """Estimated size of one checkpoint: weights + optimizer moments (fp32: 2 for Adam-type, 1 for SGD)."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    n = sum(p.numel() for p in model.parameters())
    moments = 2 if "adam" in optimizer_name else 1
    return weights + moments * 4 * n


def check_free_space(run_dir: Path, ckpt_bytes: int, keep: int, existing: int) -> None:
    """Enough free space for the checkpoints still to come: at the peak of a save `keep` old ones and
    the new one coexist, the ones already there take no new space. Skipped if the filesystem cannot say."""
    where = Path(run_dir).absolute()
    while not where.exists():  # the run directory may not exist yet: ask its filesystem
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    n = max(1, keep + 1 - existing)
    if free < ckpt_bytes * n:
        raise ConfigError(f"run_dir={str(run_dir)!r} has {_size(free)} free, the checkpoints of this run need about "
                          f"{_size(ckpt_bytes * n)} ({n} x {_size(ckpt_bytes)}: checkpoint.keep={keep} plus the one "
                          f"being written); free space or choose another run_dir")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_run_config(cfg: Config, run_dir: Path) -> str | None:
    """Write config.yaml; an existing one that differs (a resume with new hyper-parameters) is kept as
    config.<YYYYmmdd-HHMMSS>.yaml first. Returns a note saying what changed, or None."""
    path = Path(run_dir) / "config.yaml"
    note = None
    if path.is_file():
        try:
            old = load_config(path).to_dict()
        except ConfigError:
            old = None
        new = cfg.to_dict()
        if old != new:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            keep, i = path.with_name(f"config.{stamp}.yaml"), 1
            while keep.exists():
                keep, i = path.with_name(f"config.{stamp}-{i}.yaml"), i + 1
            os.replace(path, keep)
            changed = sorted(_diff_keys(old or {}, new))
            note = (f"config changed since the last start ({', '.join(changed[:8]) or 'unreadable'}); "
                    f"the previous one is kept as {keep.name}")
    tmp = path.with_name(".config.yaml.tmp")
    save_config(cfg, tmp)
    os.replace(tmp, path)
    return note


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def claim_run_dir(cfg: Config, run_dir: Path, is_main: bool, ckpt_bytes: int) -> None:
    """Rank 0, once every input has been validated: create the run directory, check free space, take
    the run directory's lock, clean what a killed save left, write config.yaml. The verdict is shared so
    every rank stops together."""
    from . import checkpoint as ckpt

    error = None
    if is_main:
        try:
            check_free_space(run_dir, ckpt_bytes, cfg.checkpoint.keep, len(ckpt.list_checkpoints(run_dir)))
            run_dir.mkdir(parents=True, exist_ok=True)
            lock_run_dir(run_dir)  # before anything is cleaned or written: one run per run_dir
            for line in ckpt.clean_stale(run_dir):
                print(f"[checkpoint] {line}")
            note = write_run_config(cfg, run_dir)
            if note:
                print(note)
        except ConfigError as e:
            error = str(e)
        except OSError as e:
            error = f"run_dir={str(run_dir)!r}: {e.strerror or e} ({e.filename}); choose another run_dir or fix it"
    error = D.broadcast_object(error)
    if error:
        raise ConfigError(error)


# ---- one owner per run directory -----------------------------------------------------------------

LOCK = ".lock"
_held: dict = {}  # run_dir -> the open lock file (the lock lives as long as the descriptor)


def _owner(path: Path) -> str:
    import json

    try:
        o = json.loads(path.read_text() or "{}")
        return f"host {o.get('host', '?')} pid {o.get('pid', '?')}, started {o.get('started', '?')}"
    except (OSError, ValueError):
        return "an unknown owner"


def lock_run_dir(run_dir: Path) -> None:
    """Rank 0 holds ``<run_dir>/.lock`` (``flock``) for the whole run, so a second launch on the same
    run directory (a double submit, a requeue while the old job lingers) stops with one line naming
    the owner before it writes anything. The kernel drops the lock when the owner dies, however it
    dies, so a lock file left behind by a dead run is taken over with a warning. On a shared
    filesystem the lock is the filesystem's (NFSv4, and Lustre/GPFS mounted with flock support);
    where it has none, only the owner file is written and the check is skipped with a warning. A
    requeue on another host takes over as soon as the old job's processes are gone."""
    import fcntl
    import json
    import socket

    run_dir = Path(run_dir).absolute()
    if str(run_dir) in _held:
        return
    path = run_dir / LOCK
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"run_dir={str(run_dir)!r} is in use by another run ({_owner(path)}); wait for it to "
                          f"finish, stop it, or choose another run_dir") from None
    except OSError as e:  # no lock support on this filesystem
        import warnings

        warnings.warn(f"{path}: the filesystem does not support locks ({e.strerror}); a second run on this "
                      f"run_dir would not be detected", stacklevel=2)
    f.seek(0)
    if f.read().strip():
        say(f"[run_dir] taking over the lock of a run that is gone ({_owner(path)})")
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    f.flush()
    _held[str(run_dir)] = f


def release_run_dirs() -> None:
    """End of a run (done, pre-empted or stopped by an error): empty the owner files and release the
    locks this process holds, so the next start does not report a stale owner."""
    while _held:
        _, f = _held.popitem()
        try:
            f.seek(0)
            f.truncate()
            f.close()
        except OSError:
            pass
