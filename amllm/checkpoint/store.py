"""The atomic step-N/ directory protocol: save, find, verify, prune.

A save writes everything into ``.tmp-step-N/``, fsyncs, writes ``meta.json`` LAST, then renames the
directory to ``step-N/`` in one ``os.rename``. So a ``step-N/`` directory either is complete or does not
exist, whatever moment a process is killed at. Pruning keeps ``checkpoint.keep`` checkpoints and never
removes the newest intact one. What goes inside is the caller's (``write_fn``): the Checkpointer
(amllm/checkpointer.py) and the backends' native files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Callable

from ..distributed import any_rank, barrier
from ..fault_injection import save_pause, save_sleep
from .files import CheckpointError, CheckpointSaveError

FORMAT_VERSION = 1
META = "meta.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


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


def latest_checkpoint(run_dir: Path, validate: Callable[[Path], None] | None = None,
                      refuse_if_all_damaged: bool = False) -> Path | None:
    """The newest usable checkpoint. One that fails `validate` (corrupt meta, unreadable files) is
    skipped with a warning naming it, and the one before is tried. When checkpoints exist but none is
    usable: None, or with `refuse_if_all_damaged` a CheckpointError naming the damage and the choices
    (a run must never silently start over on top of its damaged checkpoints)."""
    damaged, newest = [], None
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            read_meta(ckpt)
            if validate is not None:
                validate(ckpt)
            return ckpt
        except (CheckpointError, OSError, RuntimeError, ValueError) as e:
            warnings.warn(f"skipping checkpoint {ckpt}: {e}", stacklevel=2)
            damaged.append(f"{ckpt.name}: {e}")
            newest = newest or ckpt
    if damaged and refuse_if_all_damaged:
        raise CheckpointError(
            f"{run_dir}: no intact checkpoint to resume from ({'; '.join(damaged[:3])}); nothing was loaded "
            f"or deleted. Start over with checkpoint.resume=never, or resume the intact parts of one, e.g. "
            f"its weights with checkpoint.resume={newest} checkpoint.allow_changes=[optimizer] (the optimizer "
            f"state starts fresh)")
    return None


def newest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes :func:`verify_files` (no warnings), or None."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_files(ckpt)
            return ckpt
        except (CheckpointError, OSError, RuntimeError, ValueError):
            continue
    return None


def verify_files(ckpt: Path) -> None:
    """Cheap integrity check used by auto-resume (``latest_checkpoint(validate=verify_files)``):
    every file meta.json lists has its recorded size, and every ``*.pt`` opens as a zip archive
    (torch.save's format; a truncated one has no central directory). Raises CheckpointError naming
    the file. It reads directory entries, not the tensors, so it is fast for any model size."""
    ckpt = Path(ckpt)
    for rel, size in read_meta(ckpt).get("files", {}).items():
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, meta.json says {size} (truncated or corrupt)")
    for f in sorted(ckpt.rglob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{f}: not a readable torch file ({e})") from None


def clean_stale(run_dir: Path) -> list[str]:
    """Start-of-run cleanup (rank 0): remove `.tmp-step-*` left by a killed save, and put back a
    `.old-step-N` whose replacement `step-N` never arrived (killed between the two renames of a
    re-save). Returns what it did, one line each."""
    run_dir = Path(run_dir)
    done = []
    if not run_dir.is_dir():
        return done
    for old in sorted(run_dir.glob(".old-step-*")):
        final = run_dir / old.name[len(".old-"):]
        if not final.exists() and (old / META).is_file():
            os.rename(old, final)
            done.append(f"restored {final.name} from an interrupted re-save")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}")
    for tmp in sorted(run_dir.glob(".tmp-step-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed {tmp.name} (a save that did not finish)")
    return done


def save_checkpoint(run_dir: Path, step: int, meta: dict, write_fn: Callable[[Path], None],
                    is_main: bool, keep: int | None = None) -> Path:
    """Collective: every rank calls it. `write_fn(tmp_dir)` writes this rank's files.

    On an OSError on any rank (disk full, directory removed) the temporary directory is removed and
    every rank raises CheckpointSaveError naming the previous checkpoint, which stays untouched."""
    run_dir = Path(run_dir)
    final = step_dir(run_dir, step)
    tmp = run_dir / f".tmp-step-{step}"
    error = None
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except Exception as e:
        error = e
    barrier()
    if error is None:
        try:
            save_pause("begin", run_dir, step)
            write_fn(tmp)
        except Exception as e:  # keep every rank in the collective sequence; re-raise below
            error = e
    failed = any_rank(error is not None)
    if failed and is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None:
        raise _save_error(error, run_dir, step)
    if failed:
        raise CheckpointSaveError(f"another rank failed while writing {tmp}; see its error above")
    if is_main:
        try:
            _commit(run_dir, step, tmp, final, meta, keep)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
    if any_rank(error is not None):
        raise _save_error(error, run_dir, step) if error else CheckpointSaveError(
            f"rank 0 failed to commit step-{step} in {run_dir}; see its error")
    # End on a barrier, as before: with gloo, an all_gather_object work still being freed on the
    # process group's thread when the run exits right after its last save can deadlock the
    # ProcessGroupGloo destructor on the GIL (seen after a torchrun restart, torch 2.13).
    barrier()
    return final


def _save_error(error: BaseException, run_dir: Path, step: int) -> BaseException:
    """OSError -> CheckpointSaveError naming the checkpoint that survives; anything else unchanged."""
    if not isinstance(error, OSError):
        return error
    prev = [p.name for p in list_checkpoints(run_dir) if p.name != f"step-{step}"]
    kept = f"the previous checkpoint {prev[-1]} is intact" if prev else "no earlier checkpoint exists"
    why = f"{error.strerror or error} ({error.filename})" if error.filename else str(error)
    return CheckpointSaveError(f"saving step-{step} in {run_dir} failed: {why}; {kept}; free space or "
                               f"fix the directory, then run the same command to resume")


def _commit(run_dir: Path, step: int, tmp: Path, final: Path, meta: dict, keep: int | None) -> None:
    """Rank 0: fsync the files, write meta.json last, rename .tmp-step-N -> step-N, prune."""
    save_pause("written", run_dir, step)
    save_sleep()  # test hook: widen the window for kill -9 tests
    _fsync_tree(tmp)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    meta = {**meta, "step": step, "format_version": FORMAT_VERSION, "time": time.time(), "files": files}
    save_pause("before-meta", run_dir, step)
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    with open(tmp / META, "rb") as f:
        os.fsync(f.fileno())
    save_pause("before-rename", run_dir, step)
    if final.exists():  # re-saving a step (e.g. the end of a run that just saved): replace it
        old = run_dir / f".old-step-{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(run_dir)
    save_pause("renamed", run_dir, step)
    if keep:
        prune(run_dir, keep)


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and stale temporaries. The newest
    intact checkpoint is never removed, even when damaged ones are newer: it is what a resume needs."""
    ckpts = list_checkpoints(run_dir)
    old = ckpts[:-keep]
    if old:
        safe = newest_intact(run_dir)
        for ckpt in old:
            if ckpt != safe:
                shutil.rmtree(ckpt, ignore_errors=True)
    for stale in Path(run_dir).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in Path(run_dir).glob(".old-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
