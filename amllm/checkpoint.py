"""All of save and resume: one Checkpointer over a run's named stateful parts, atomic `step-N/` directories.

    checkpointer = Checkpointer(cfg, info, backend, run_dir, meta_now)
    resumed = checkpointer.resume(sampler)       # None: a fresh start; else the trainer state
    ...
    checkpointer.save(step, {"tokens": ..., "sampler": sampler.state_dict(), ...})

What a checkpoint holds, and who provides it (torchtitan's "stateful parts"):

| part                          | provided by                    | file(s) in step-N/                          |
|-------------------------------|--------------------------------|---------------------------------------------|
| model, optimizer (AM state:   | the backend, as state dicts    | ddp: model.pt + optimizer.pt (whole)        |
| moments, pi, last beta, beta  | and how to write them          | fsdp2: dcp/ (torch DCP shards + am_state)   |
| step, fallbacks, prev lr,     |                                | deepspeed: deepspeed/ (DeepSpeed's per-rank |
| per-layer layout)             |                                | files + am_layout_rank<r>.pt)               |
| step, tokens, skipped steps,  | train.py's counters            | trainer.pt                                  |
| sampler position, wandb id    |                                |                                             |
| optimizer hyper-parameters,   | the checkpointer               | trainer.pt (checked on every backend)       |
| parameter names per group     |                                |                                             |
| per-rank RNG streams          | the checkpointer               | rng-rank<r>.pt                              |
| the lr schedule               | a function of the step         | (nothing)                                   |
| what it was saved for         | the checkpointer               | meta.json (written last), config.yaml       |

Resume has two paths (docs/faults.md, "cross-backend resume"):

* **native** -- the backend reads its own files: DDP's on any world size (they are whole), FSDP2's
  DCP on any world size (DCP stores global shapes and reshards N -> M; a plain/DDP model loads it too),
  DeepSpeed's on the same world size and ZeRO layout (stage, precision).
* **whole per parameter** -- anything else (DeepSpeed <-> FSDP2 <-> DDP, ZeRO stage changes, DeepSpeed
  on another world size): :func:`read_full` reassembles every parameter's weights and optimizer state
  by name in each process (DCP's reader; DeepSpeed's fp32 shards and AM state placed by the AM layout
  files, see ``deepspeed_backend.read_zero_full``), and
  the backend cuts out what it keeps (:meth:`Backend.load_full`). Costs the whole model's fp32 weights
  and optimizer state in CPU memory of every process, once, at resume.

Either way the run continues with exactly the next unseen global batch: the sampler's position is
global, so any world size with the same ``train.batch_size`` draws the same batches.

Layout of a run directory::

    runs/<name>/
      config.yaml  metrics.jsonl  .lock
      step-200/    meta.json  trainer.pt  rng-rank0.pt ...  config.yaml  + the backend's files
      step-400/    ...
      .tmp-step-600/    a save in progress (or one killed mid-way): never read, removed later

A save writes everything into `.tmp-step-N/`, fsyncs, writes `meta.json` LAST, then renames the
directory to `step-N/` in one `os.rename`. So a `step-N/` directory either is complete or does not
exist, whatever moment a process is killed at. Loading uses `torch.load(weights_only=True)`: the
files hold only tensors and plain Python containers, never pickled objects. Pruning keeps
``checkpoint.keep`` checkpoints and never removes the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch

from .fault_injection import save_pause, save_sleep
from .parallel.distributed import any_rank, barrier, say

FORMAT_VERSION = 1
META = "meta.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, directory gone); the previous checkpoint is untouched."""


class Checkpointer:
    """Saves and resumes a run's whole state through its backend; owns every check and message.

    ``meta_now``: what this run is (model/tokenizer/data fingerprints, optimizer name, backend, world
    size), compared with a checkpoint's meta.json before anything is loaded."""

    def __init__(self, cfg, info, backend, run_dir: Path, meta_now: dict):
        self.cfg, self.info, self.backend, self.run_dir = cfg, info, backend, Path(run_dir)
        self.meta_now = meta_now
        self.allow = tuple(cfg.checkpoint.allow_changes)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.backend.am_optimizer

    # -- resume -----------------------------------------------------------------------------------
    def find(self) -> Path | None:
        """The checkpoint to resume from (checkpoint.resume = auto | never | path), checked for
        compatibility: another model, tokenizer, optimizer or data is refused with what differs
        (checkpoint.allow_changes accepts the last two). Auto skips a damaged latest with a warning;
        when every checkpoint is damaged it stops with the choices (never a silent fresh start)."""
        from .config import ConfigError
        from .parallel import distributed as D

        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":  # rank 0 looks, every rank uses its answer (or its error)
            found = None
            if self.info.is_main:
                try:
                    found = latest_checkpoint(self.run_dir, validate=verify_files, refuse_if_all_damaged=True)
                except CheckpointError as e:
                    found = e
            found = D.broadcast_object(found)
            if isinstance(found, CheckpointError):
                raise found
        else:
            found = Path(resume)
            if not found.is_dir():
                raise ConfigError(f"checkpoint.resume={resume!r} is not a directory; give a step-N/ path, auto or never")
        if found is None:
            return None
        meta = read_meta(found)
        for note in check_compatible(found, meta, self.meta_now, self.allow):
            self._say(note)
        return found

    def resume(self, sampler) -> dict | None:
        """Find a checkpoint and load every part of it; None when the run starts fresh. Returns the
        trainer state (step, tokens, skipped_steps, wandb_id, ...) with ``path`` added."""
        path = self.find()
        if path is None:
            return None
        meta = read_meta(path)
        trainer = load_torch(path / "trainer.pt")
        if "data" in self.allow:  # the cheap checks first: a changed global batch stops before any big read
            sampler.step = int(trainer["sampler"]["step"])  # another data manifest: position only
        else:
            sampler.load_state_dict(trainer["sampler"])  # a global position: any world size, same batches
        self._load_model_and_optimizer(path, meta, trainer)
        restore_rng(path, self.info.rank, self.info.device, trainer)  # this rank's own RNG streams
        return {**trainer, "path": path}

    def _load_model_and_optimizer(self, path: Path, meta: dict, trainer: dict) -> None:
        """Model and optimizer by the native or the whole-per-parameter path (module docstring).
        Changed optimizer hyper-parameters are refused (or, when allowed, re-applied after the load) on
        every backend: trainer.pt holds the saved ones, whatever layout the optimizer state has."""
        backend, optimizer, world = self.backend, self.optimizer, self.info.world_size
        same_optimizer = meta.get("optimizer", self.cfg.optim.name) == self.cfg.optim.name
        fresh = optimizer_hparams(optimizer)
        diffs = check_hparams(fresh, trainer.get("optim_hparams", []), self.allow, path) if same_optimizer else []
        saved_world = meta.get("world_size", world)
        saved_layout = meta.get("layout", meta.get("backend", "ddp"))
        if backend.reads_natively(meta, world):
            if saved_world != world:
                self._say(f"{path} was saved on {saved_world} rank(s), resuming on {world}: the same global "
                          f"batches, summed in another order")
            backend.read(path, lambda state: self._load_optimizer(optimizer, state, same_optimizer, trainer, path))
        else:
            self._say(f"{path} was saved by {saved_layout} on {saved_world} rank(s); loading it whole per parameter "
                      f"into {backend.layout} on {world} rank(s)")
            names = trainer.get("param_names") or backend.param_names()
            full = read_full(path, names, with_optimizer=same_optimizer, allow=self.allow)
            backend.load_full(full["model"], full["optim"])
        for note in apply_hparams(optimizer, fresh, diffs):
            self._say(note)

    def _load_optimizer(self, optimizer, state, same_optimizer: bool, trainer: dict, path: Path) -> None:
        """`state`: the optimizer state dict, or a zero-argument function that reads it."""
        if not same_optimizer:  # allowed by checkpoint.allow_changes: a fresh optimizer state
            return
        try:
            state = state() if callable(state) else state
        except CheckpointError as e:
            if "optimizer" not in self.allow:
                raise
            self._say(f"{e}; the optimizer state starts fresh (checkpoint.allow_changes=[optimizer])")
            return
        if "optim_hparams" in trainer:
            optimizer.load_state_dict(state)
        else:  # a checkpoint older than optim_hparams: compare with the optimizer file's own groups
            for note in load_optimizer_state(optimizer, state, self.allow, path / "optimizer.pt"):
                self._say(note)

    # -- save -------------------------------------------------------------------------------------
    def save(self, step: int, trainer: dict) -> Path:
        """Collective: every rank calls it. ``trainer``: train.py's counters and sampler state (tokens,
        sampler, skipped_steps, wandb_id). Never writes a NaN: a non-finite parameter or optimizer
        entry stops the run with the previous checkpoint intact."""
        from .config import save_config
        from .guard import check_finite_state

        backend, info = self.backend, self.info
        state = {**trainer, "step": step, "rng_cpu": torch.get_rng_state(),
                 "optim_hparams": optimizer_hparams(self.optimizer), "param_names": backend.param_names()}

        def write(tmp: Path) -> None:
            model_state, optim_state = backend.state_for_check() if info.is_main else ({}, {})
            check_finite_state(model_state, "parameter", step)
            check_finite_state(optim_state, "optimizer state", step)
            backend.write(tmp, model_state or None, optim_state or None)  # every rank: sharded backends
            save_rng(tmp, info.rank, info.device)  # every rank: RNG streams differ per rank
            if info.is_main:
                save_pause("after-model.pt", self.run_dir, step)
                save_torch(state, tmp / "trainer.pt")
                save_config(self.cfg, tmp / "config.yaml")

        meta = {**self.meta_now, "layout": backend.layout, "tokens": trainer.get("tokens", 0)}
        return save_checkpoint(self.run_dir, step, meta, write, info.is_main, self.cfg.checkpoint.keep)

    @staticmethod
    def _say(line: str) -> None:
        say(f"[checkpoint] {line}")


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


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def save_rng(tmp: Path, rank: int, device: torch.device) -> None:
    """This rank's RNG states (CPU, and its CUDA device) as ``rng-rank<r>.pt``: every rank writes its own."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    save_torch(state, Path(tmp) / f"rng-rank{rank}.pt")


def restore_rng(ckpt: Path, rank: int, device: torch.device, trainer_state: dict) -> None:
    """Restore what :func:`save_rng` wrote for this rank. A rank the checkpoint had no file for (it was
    saved on fewer ranks, or before per-rank files existed) takes rank 0's states from trainer.pt."""
    f = Path(ckpt) / f"rng-rank{rank}.pt"
    state = load_torch(f) if f.is_file() else {"cpu": trainer_state["rng_cpu"], "cuda": trainer_state.get("rng_cuda")}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


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


# ---- resume compatibility -------------------------------------------------------------------------

ALLOWED_CHANGES = ("optimizer", "optimizer_hparams", "data")
"""What `checkpoint.allow_changes` may list. The model architecture and the tokenizer never change
under a checkpoint (the weights would not fit or would mean other tokens): use a new run_dir."""

_GROUP_KEYS_FREE = {"params", "lr", "initial_lr", "prev_lr", "foreach", "fused", "capturable", "differentiable"}
"""Param-group entries that are state or kernel choices, not hyper-parameters: never compared. `lr` is
set from the config's schedule every step, so a new optim.lr always applies on resume."""


def manifest_fingerprint(manifest: dict) -> str:
    """A short hash of what a data manifest describes (source, tokenizer, caps, token counts), not of
    when it was made: re-preparing the same data gives the same fingerprint."""
    keep = {k: manifest.get(k) for k in ("format_version", "source", "source_details", "tokenizer", "dtype", "caps")}
    keep["n_tokens"] = {s: v.get("n_tokens") for s, v in sorted(manifest.get("splits", {}).items())}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_compatible(found: Path, meta: dict, meta_now: dict, allow: tuple | list = ()) -> list[str]:
    """Refuse a checkpoint saved for another model, tokenizer, optimizer or data, with what differs.
    Differences the user allowed (`checkpoint.allow_changes`) are returned as notes instead."""
    fix = "use a new run_dir or checkpoint.resume=never"
    for key, what in (("model_fingerprint", "model architecture"), ("tokenizer_fingerprint", "tokenizer")):
        if meta.get(key) != meta_now.get(key):
            raise CheckpointError(
                f"{found} was saved with another {what} ({meta.get(key)} vs {meta_now.get(key)} now: "
                f"model {meta.get('model')!r} vs {meta_now.get('model')!r}); {fix}")
    notes = []
    checks = (("optimizer", "optimizer", "optimizer", "optimizer state starts fresh"),
              ("data_fingerprint", "data manifest", "data", "sampler continues at the step count only"))
    for key, what, flag, consequence in checks:
        if key not in meta or meta.get(key) == meta_now.get(key):  # checkpoints older than the key pass
            continue
        diff = f"{found} was saved with {what} {meta.get(key)!r}, this run has {meta_now.get(key)!r}"
        if flag not in allow:
            raise CheckpointError(f"{diff}; to continue anyway set checkpoint.allow_changes=[{flag}] "
                                  f"({consequence}), or {fix}")
        notes.append(f"{diff} (allowed: {consequence})")
    return notes


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, allow: tuple | list = (),
                         where: Path | str = "checkpoint") -> list[str]:
    """optimizer.load_state_dict(state), but a hyper-parameter that differs from this run's config
    (betas, eps, weight_decay, lam, ...) is refused instead of silently taken from the checkpoint
    (torch's load_state_dict would restore the old values); with allow_changes=[optimizer_hparams]
    the config's values are applied after loading. Returns notes about applied changes."""
    fresh = optimizer_hparams(optimizer)
    diffs = check_hparams(fresh, state.get("param_groups", []), allow, where)
    optimizer.load_state_dict(state)
    return apply_hparams(optimizer, fresh, diffs)


def optimizer_hparams(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The hyper-parameters of each param group (no params, lr or kernel choices), as plain values:
    saved in trainer.pt so every backend's resume can compare them, whatever its file layout."""
    return [{k: _plain(v) for k, v in g.items() if k not in _GROUP_KEYS_FREE} for g in optimizer.param_groups]


def check_hparams(fresh: list[dict], saved: list[dict], allow: tuple | list = (), where: Path | str = "checkpoint"):
    """The (group, key, saved, now) hyper-parameters that differ; CheckpointError unless
    checkpoint.allow_changes has optimizer_hparams."""
    diffs = []
    for i, (now, old) in enumerate(zip(fresh, saved)):
        for k, v in now.items():
            if k in old and _plain(old[k]) != _plain(v):
                diffs.append((i, k, _plain(old[k]), _plain(v)))
    if diffs and "optimizer_hparams" not in allow:
        what = ", ".join(f"{k} {a} -> {b}" for _, k, a, b in diffs[:4])
        raise CheckpointError(f"{where}: optimizer hyper-parameters differ from the checkpoint ({what}); set "
                              f"checkpoint.allow_changes=[optimizer_hparams] to apply the new values, or "
                              f"restore them in the config")
    return diffs


def apply_hparams(optimizer: torch.optim.Optimizer, fresh: list[dict], diffs) -> list[str]:
    """After a load restored the checkpoint's values: put this run's (allowed) values back."""
    for i, k, _, _ in diffs:
        optimizer.param_groups[i][k] = optimizer.defaults[k] if k in optimizer.defaults else fresh[i][k]
    return [f"optimizer {k}: {a} -> {b} (allowed)" for _, k, a, b in diffs]


# ---- whole per-parameter state: the layout every backend can load ----------------------------------


def optimizer_by_name(state: dict, names: list[list[str]]) -> dict:
    """torch's index-keyed optimizer state dict -> FQN-keyed (torch DCP's ``get_state_dict`` layout):
    ``names``: the parameter names of each param group, in order (saved in trainer.pt)."""
    flat = [n for group in names for n in group]
    if len(flat) != sum(len(g["params"]) for g in state["param_groups"]):
        raise CheckpointError(f"the optimizer state has {sum(len(g['params']) for g in state['param_groups'])} "
                              f"parameters, the model {len(flat)}; it was saved for another model")
    return {"state": {flat[i]: v for i, v in state["state"].items()},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [flat[i] for i in g["params"]]}
                             for g in state["param_groups"]],
            "am_state": state.get("am_state")}


def optimizer_by_index(optim: dict, names: list[list[str]]) -> dict:
    """FQN-keyed optimizer state -> torch's index-keyed one for an optimizer whose groups hold the
    parameters ``names`` (in order). The groups must hold the same parameters as when saved."""
    pos, index = {}, 0
    groups = []
    for g, (group_names, saved) in enumerate(zip(names, optim["param_groups"])):
        if set(group_names) != set(saved["params"]):
            raise CheckpointError(f"optimizer param group {g} holds other parameters than when it was saved; "
                                  f"resume with the optimizer settings the run was saved with")
        for n in group_names:
            pos[n] = index
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": [pos[n] for n in group_names]})
    if len(names) != len(optim["param_groups"]):
        raise CheckpointError(f"the optimizer has {len(names)} param groups, the checkpoint "
                              f"{len(optim['param_groups'])}; resume with the settings it was saved with")
    state = {"state": {pos[n]: v for n, v in optim["state"].items() if n in pos}, "param_groups": groups}
    if optim.get("am_state") is not None:
        state["am_state"] = optim["am_state"]
    return state


def read_full(step_dir: Path, names: list[list[str]] | None = None, with_optimizer: bool = True,
              allow: tuple | list = ()) -> dict:
    """Any amllm checkpoint as whole tensors per parameter, in one process, whatever backend and world
    size wrote it: ``{"model": {fqn: tensor}, "optim": FQN-keyed optimizer state with "am_state", or
    None}``. ``names``: the parameter names per param group, for model.pt/optimizer.pt (index-keyed).
    A damaged optimizer file with ``allow`` containing "optimizer" gives the weights alone."""
    step_dir = Path(step_dir)
    what = f"{step_dir}: no model.pt, dcp/ or deepspeed/ inside; not an amllm checkpoint"
    try:
        if (step_dir / "model.pt").is_file():
            full = {"model": load_torch(step_dir / "model.pt"), "optim": None}
            if with_optimizer:
                try:
                    full["optim"] = optimizer_by_name(load_torch(step_dir / "optimizer.pt"), names)
                except CheckpointError as e:
                    if "optimizer" not in allow:
                        raise
                    warnings.warn(f"{e}; the optimizer state starts fresh (checkpoint.allow_changes=[optimizer])",
                                  stacklevel=2)
            return full
        if (step_dir / "dcp").is_dir():
            from .parallel.fsdp import read_dcp_full

            what = f"{step_dir / 'dcp'}: cannot be read"
            full = read_dcp_full(step_dir / "dcp")
        elif (step_dir / "deepspeed").is_dir():
            from .parallel.deepspeed_backend import read_zero_full

            what = f"{step_dir / 'deepspeed'}: cannot be read"
            full = read_zero_full(step_dir, tag="deepspeed", with_optimizer=with_optimizer)
        else:
            raise CheckpointError(what)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{what} ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    if not with_optimizer:
        full["optim"] = None
    return full


def full_model_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of a checkpoint, in one process, whatever backend wrote it."""
    return {k: v.contiguous() for k, v in read_full(step_dir, with_optimizer=False)["model"].items()}
