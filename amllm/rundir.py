"""The run directory: checked before anything is written, claimed by one run at a time (a lock).

docs/faults.md lists every failure, what it costs and which test shows it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from .config import Config, ConfigError, load_config, save_config
from . import distributed as D
from .distributed import say


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
