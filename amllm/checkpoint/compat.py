"""Is a checkpoint this run's? Fingerprints (model, tokenizer, data), the optimizer's name and its
hyper-parameters, compared before anything is loaded; ``checkpoint.allow_changes`` turns some refusals
into notes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .files import CheckpointError


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
