"""Checkpoints a user can trust: atomic `step-N/` directories, auto-resume from the latest.

Layout of a run directory::

    runs/<name>/
      config.yaml  metrics.jsonl
      step-200/    meta.json  model.pt  optimizer.pt  trainer.pt   (backend-specific files allowed)
      step-400/    ...
      .tmp-step-600/    a save in progress (or one killed mid-way): never read, removed later

A save writes everything into `.tmp-step-N/`, fsyncs, writes `meta.json` LAST, then renames the
directory to `step-N/` in one `os.rename`. So a `step-N/` directory either is complete or does not
exist, whatever moment a process is killed at. Loading uses `torch.load(weights_only=True)`: the
files hold only tensors and plain Python containers, never pickled objects.

Which ranks write what is the backend's business (`write_fn` below): with DDP rank 0 writes the
(identical) model and optimizer; FSDP2 / DeepSpeed write sharded files from every rank into the same
temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .parallel.distributed import any_rank, barrier

FORMAT_VERSION = 1
META = "meta.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step}"


def read_meta(ckpt: Path) -> dict:
    """meta.json of a checkpoint directory; CheckpointError if it is missing or unreadable."""
    f = Path(ckpt) / META
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {META} (an incomplete save?); point checkpoint.resume at a complete step-N/") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e}); the checkpoint is corrupt, use an earlier step-N/") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{f}: not an amllm checkpoint meta file")
    return meta


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (a step-N/ with a readable meta.json), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path, validate: Callable[[Path], None] | None = None) -> Path | None:
    """The newest usable checkpoint. One that fails `validate` (corrupt meta, unreadable files) is
    skipped with a warning naming it, and the one before is tried."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            read_meta(ckpt)
            if validate is not None:
                validate(ckpt)
            return ckpt
        except (CheckpointError, OSError, RuntimeError, ValueError) as e:
            warnings.warn(f"skipping checkpoint {ckpt}: {e}", stacklevel=2)
    return None


def save_checkpoint(run_dir: Path, step: int, meta: dict, write_fn: Callable[[Path], None],
                    is_main: bool, keep: int | None = None) -> Path:
    """Collective: every rank calls it. `write_fn(tmp_dir)` writes this rank's files."""
    run_dir = Path(run_dir)
    final = step_dir(run_dir, step)
    tmp = run_dir / f".tmp-step-{step}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    error = None
    try:
        write_fn(tmp)
    except Exception as e:  # keep every rank in the collective sequence; re-raise below
        error = e
    failed = any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"another rank failed while writing {tmp}; see its error above")
    if is_main:
        hook = os.environ.get("AMLLM_TEST_SAVE_SLEEP")  # test hook: widen the window for kill -9 tests
        if hook:
            time.sleep(float(hook))
        meta = {**meta, "step": step, "format_version": FORMAT_VERSION, "time": time.time()}
        _fsync_tree(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        with open(tmp / META, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. the end of a run that just saved): replace it
            old = run_dir / f".old-step-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(run_dir)
        if keep:
            prune(run_dir, keep)
    barrier()
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and stale temporaries."""
    ckpts = list_checkpoints(run_dir)
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(run_dir).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in Path(run_dir).glob(".old-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path, map_location="cpu"):
    """torch.load restricted to tensors and plain containers (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete, use an earlier step-N/")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"the file is corrupt, use an earlier step-N/") from None
