"""All of save and resume: one Checkpointer over a run's named stateful parts, composing the backend's
native files with the checkpoint file protocol (amllm/checkpoint/).

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

Resume has two paths (docs/faults.md, "What survives what", and docs/parallel.md):

* **native** -- the backend reads its own files: DDP's on any world size (they are whole), FSDP2's
  DCP on any world size (DCP stores global shapes and reshards N -> M), DeepSpeed's on the same
  world size and ZeRO layout (stage, precision).
* **whole per parameter** -- anything else (DeepSpeed <-> FSDP2 <-> DDP, ZeRO stage changes, DeepSpeed
  on another world size): parallel/full_state.read_full reassembles every parameter's weights and
  optimizer state by name in each process, and the backend cuts out what it keeps
  (``Backend.load_full``). Costs the whole model's fp32 weights and optimizer state in CPU memory of
  every process, once, at resume.

With ``checkpoint.allow_changes=[optimizer]`` and another ``optim.name``, either path loads the weights
alone and the new optimizer starts fresh. Either way the run continues with exactly the next unseen
global batch: the sampler's position is global, so any world size with the same ``train.batch_size``
draws the same batches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt  # the protocol, by attribute (tests replace ckpt.save_torch to fill the disk)
from .config import Config, ConfigError, save_config
from .distributed import DistInfo, broadcast_object, say
from .fault_injection import save_pause
from .guard import check_finite_state
from .parallel.backend import Backend
from .parallel.full_state import read_full


class Checkpointer:
    """Saves and resumes a run's whole state through its backend; owns every check and message.

    ``meta_now``: what this run is (model/tokenizer/data fingerprints, optimizer name, backend, world
    size), compared with a checkpoint's meta.json before anything is loaded."""

    def __init__(self, cfg: Config, info: DistInfo, backend: Backend, run_dir: Path, meta_now: dict):
        self.cfg, self.info, self.backend, self.run_dir = cfg, info, backend, Path(run_dir)
        self.meta_now = meta_now
        self.allow = tuple(cfg.checkpoint.allow_changes)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.backend.optimizer

    # -- resume -----------------------------------------------------------------------------------
    def find(self) -> Path | None:
        """The checkpoint to resume from (checkpoint.resume = auto | never | path), checked for
        compatibility: another model, tokenizer, optimizer or data is refused with what differs
        (checkpoint.allow_changes accepts the last two). Auto skips a damaged latest with a warning;
        when every checkpoint is damaged it stops with the choices (never a silent fresh start)."""

        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":  # rank 0 looks, every rank uses its answer (or its error)
            found = None
            if self.info.is_main:
                try:
                    found = ckpt.latest_checkpoint(self.run_dir, validate=ckpt.verify_files, refuse_if_all_damaged=True)
                except ckpt.CheckpointError as e:
                    found = e
            found = broadcast_object(found)
            if isinstance(found, ckpt.CheckpointError):
                raise found
        else:
            found = Path(resume)
            if not found.is_dir():
                raise ConfigError(f"checkpoint.resume={resume!r} is not a directory; give a step-N/ path, auto or never")
        if found is None:
            return None
        meta = ckpt.read_meta(found)
        for note in ckpt.check_compatible(found, meta, self.meta_now, self.allow):
            self._say(note)
        return found

    def resume(self, sampler) -> dict | None:
        """Find a checkpoint and load every part of it; None when the run starts fresh. Returns the
        trainer state (step, tokens, skipped_steps, wandb_id, ...) with ``path`` added."""
        path = self.find()
        if path is None:
            return None
        meta = ckpt.read_meta(path)
        trainer = ckpt.load_torch(path / "trainer.pt")
        if "data" in self.allow:  # the cheap checks first: a changed global batch stops before any big read
            sampler.step = int(trainer["sampler"]["step"])  # another data manifest: position only
        else:
            sampler.load_state_dict(trainer["sampler"])  # a global position: any world size, same batches
        self._load_model_and_optimizer(path, meta, trainer)
        ckpt.restore_rng(path, self.info.rank, self.info.device, trainer)  # this rank's own RNG streams
        say(f"resumed from {path} (step {trainer['step']}, {trainer.get('tokens', 0):,} tokens)")
        return {**trainer, "path": path}

    def _load_model_and_optimizer(self, path: Path, meta: dict, trainer: dict) -> None:
        """Model and optimizer by the native or the whole-per-parameter path (module docstring).
        Changed optimizer hyper-parameters are refused (or, when allowed, re-applied after the load) on
        every backend: trainer.pt holds the saved ones, whatever layout the optimizer state has."""
        backend, optimizer, world = self.backend, self.optimizer, self.info.world_size
        same_optimizer = meta.get("optimizer", self.cfg.optim.name) == self.cfg.optim.name
        fresh = ckpt.optimizer_hparams(optimizer)
        diffs = ckpt.check_hparams(fresh, trainer.get("optim_hparams", []), self.allow, path) if same_optimizer else []
        saved_world = meta.get("world_size", world)
        saved_layout = meta.get("layout", meta.get("backend", "ddp"))
        if backend.reads_natively(meta, world):
            if saved_world != world:
                self._say(f"{path} was saved on {saved_world} rank(s), resuming on {world}: the same global "
                          f"batches, summed in another order")
            # another optimizer (allowed): the weights alone, on every backend
            backend.read(path, (lambda state: self._load_optimizer(optimizer, state, trainer, path))
                         if same_optimizer else None)
        else:
            self._say(f"{path} was saved by {saved_layout} on {saved_world} rank(s); loading it whole per parameter "
                      f"into {backend.layout} on {world} rank(s)")
            names = trainer.get("param_names") or backend.param_names()
            full = read_full(path, names, with_optimizer=same_optimizer, allow=self.allow)
            backend.load_full(full["model"], full["optim"])
        for note in ckpt.apply_hparams(optimizer, fresh, diffs):
            self._say(note)

    def _load_optimizer(self, optimizer, state, trainer: dict, path: Path) -> None:
        """`state`: the optimizer state dict, or a zero-argument function that reads it."""
        try:
            state = state() if callable(state) else state
        except ckpt.CheckpointError as e:
            if "optimizer" not in self.allow:
                raise
            self._say(f"{e}; the optimizer state starts fresh (checkpoint.allow_changes=[optimizer])")
            return
        if "optim_hparams" in trainer:
            optimizer.load_state_dict(state)
        else:  # a checkpoint older than optim_hparams: compare with the optimizer file's own groups
            for note in ckpt.load_optimizer_state(optimizer, state, self.allow, path / "optimizer.pt"):
                self._say(note)

    # -- save -------------------------------------------------------------------------------------
    def save(self, step: int, trainer: dict) -> Path:
        """Collective: every rank calls it. ``trainer``: train.py's counters and sampler state (tokens,
        sampler, skipped_steps, wandb_id). Never writes a NaN: a non-finite parameter or optimizer
        entry stops the run with the previous checkpoint intact."""
        backend, info = self.backend, self.info
        state = {**trainer, "step": step, "rng_cpu": torch.get_rng_state(),
                 "optim_hparams": ckpt.optimizer_hparams(self.optimizer), "param_names": backend.param_names()}

        def write(tmp: Path) -> None:
            model_state, optim_state = backend.state_for_check() if info.is_main else ({}, {})
            check_finite_state(model_state, "parameter", step)
            check_finite_state(optim_state, "optimizer state", step)
            backend.write(tmp, model_state or None, optim_state or None)  # every rank: sharded backends
            ckpt.save_rng(tmp, info.rank, info.device)  # every rank: RNG streams differ per rank
            if info.is_main:
                save_pause("after-model.pt", self.run_dir, step)
                ckpt.save_torch(state, tmp / "trainer.pt")
                save_config(self.cfg, tmp / "config.yaml")

        meta = {**self.meta_now, "layout": backend.layout, "tokens": trainer.get("tokens", 0)}
        return ckpt.save_checkpoint(self.run_dir, step, meta, write, info.is_main, self.cfg.checkpoint.keep)

    @staticmethod
    def _say(line: str) -> None:
        say(f"[checkpoint] {line}")
