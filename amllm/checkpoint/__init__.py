"""The checkpoint file protocol, below the backends: what a ``step-N/`` directory holds and how it is
written, found, checked and read. Nothing here knows a backend; the Checkpointer that composes the
backends with this protocol is amllm/checkpointer.py, and the reading of another backend's files as
whole per-parameter state is amllm/parallel/full_state.py.

    store.py    the atomic step-N/ directories: save_checkpoint, latest_checkpoint, verify_files, prune
    files.py    errors, torch files (load_torch: weights_only), per-rank RNG streams
    compat.py   is it this run's checkpoint? fingerprints, optimizer name and hyper-parameters
    rekey.py    optimizer state dicts by index (optimizer.pt) <-> by parameter name

Layout of a run directory::

    runs/<name>/
      config.yaml  metrics.jsonl  .lock
      step-200/    meta.json  trainer.pt  rng-rank0.pt ...  config.yaml  + the backend's files
      step-400/    ...
      .tmp-step-600/    a save in progress (or one killed mid-way): never read, removed later
"""

from .compat import (apply_hparams, check_compatible, check_hparams, load_optimizer_state, manifest_fingerprint,
                     optimizer_hparams)
from .files import CheckpointError, CheckpointSaveError, load_torch, restore_rng, save_rng, save_torch
from .rekey import optimizer_by_index, optimizer_by_name
from .store import (FORMAT_VERSION, META, clean_stale, latest_checkpoint, list_checkpoints, newest_intact, prune,
                    read_meta, save_checkpoint, step_dir, verify_files)

__all__ = ["FORMAT_VERSION", "META", "CheckpointError", "CheckpointSaveError", "apply_hparams", "check_compatible",
           "check_hparams", "clean_stale", "latest_checkpoint", "list_checkpoints", "load_optimizer_state",
           "load_torch", "manifest_fingerprint", "newest_intact", "optimizer_by_index", "optimizer_by_name",
           "optimizer_hparams", "prune", "read_meta", "restore_rng", "save_checkpoint", "save_rng", "save_torch",
           "step_dir", "verify_files"]
