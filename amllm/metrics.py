"""Run metrics: `metrics.jsonl` always, wandb when asked, one writer (rank 0).

metrics.jsonl holds one JSON object per line:

    {"kind": "train", "step", "tokens", "loss", "lr", "grad_norm", "beta", "beta_min", "beta_max",
     "betas" (per-layer runs), "beta_fallbacks", "beta_dg", "beta_cos", "beta_lam" (optim.beta_terms:
     the terms of β = (1 + lam)/(1 + dg² − 2 dg cos) before the clip; "betas_dg", "betas_cos",
     "betas_lam" per layer in per-layer runs), "tokens_per_s", "tokens_per_s_per_device", "tflops",
     "tflops_per_device", "mfu", "time"}
    {"kind": "eval", "step", "tokens", "val_loss", "val_ppl", "val_tokens", "time"}

`step` counts completed optimizer steps (1 after the first update). Throughput is over the training
steps since the previous train line, evaluation and checkpoint time excluded: `tokens_per_s` for the
whole job, `..._per_device` per GPU (per rank on CPU), `mfu` = achieved / peak FLOP/s of one device
(:func:`peak_flops`; null where the peak is unknown, e.g. on CPU). FLOPs are model FLOPs
(`model.flops_per_token`: 6N + attention): the recompute of activation checkpointing is not counted,
as in PaLM's and torchtitan's MFU. On resume the file is cut
back to the checkpoint's step first, so a resumed run's file reads as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

import torch


class MetricsFileError(ValueError):
    """A metrics.jsonl line that is not a JSON object (the message names the file and line)."""


def read_metrics(run: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl (``run``: the run directory or the file), in file order;
    with ``kind`` only those (a line without "kind" is "eval" when it has val_loss, else "train").
    The one reader of the file for the tools and the tests. A live or killed run's unfinished last line
    is skipped; any other line that is not a JSON object raises :class:`MetricsFileError`."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines) and not text.endswith("\n"):
                continue  # mid-write: the writer has not finished this line yet
            raise MetricsFileError(f"{path} line {lineno}: not valid JSON ({err.msg}); fix or delete the line") from None
        if not isinstance(rec, dict):
            raise MetricsFileError(f"{path} line {lineno}: expected a JSON object, got {type(rec).__name__}; "
                                   f"fix or delete the line")
        rec.setdefault("kind", "eval" if "val_loss" in rec else "train")
        if kind is None or rec["kind"] == kind:
            out.append(rec)
    return out


def beta_stats(last_beta: torch.Tensor | None) -> dict:
    """β telemetry from an AM optimizer's `last_beta` (0-d global, or 1-d per layer)."""
    if last_beta is None:
        return {"beta": None, "beta_min": None, "beta_max": None}
    b = last_beta.detach().float().cpu()
    if b.ndim == 0:
        v = b.item()
        return {"beta": v, "beta_min": v, "beta_max": v}
    if b.numel() == 0:
        return {"beta": None, "beta_min": None, "beta_max": None}
    return {"beta": b.mean().item(), "beta_min": b.min().item(), "beta_max": b.max().item(),
            "betas": [round(x, 6) for x in b.tolist()]}


def beta_term_stats(terms: torch.Tensor | None, per_layer: bool) -> dict:
    """The terms β is computed from (an AM-AdamW's ``last_beta_terms``, ``[L, 3]`` = |d|/|g|,
    cos(d, g), ℓ): scalars for one global β, 4-digit lists per layer (39 tensors: ~1 kB a line).
    NaN (a β without gradient) is written as null."""
    if terms is None:
        return {}
    t = terms.detach().double().cpu()
    cols = [[None if math.isnan(x) else x for x in t[:, k].tolist()] for k in range(3)]
    names = ("beta_dg", "beta_cos", "beta_lam")
    if not per_layer:
        return {name: col[0] for name, col in zip(names, cols)}
    return {"betas" + name[4:]: [None if x is None else float(f"{x:.4g}") for x in col]
            for name, col in zip(names, cols)}


# Dense peak FLOP/s per GPU from the vendors' data sheets (no sparsity), by the dtype matmuls run in.
# "tf32": fp32 training with TF32 matmuls allowed (train.tf32, the default on CUDA).
PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},  # SXM
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},
}


def peak_flops(device: torch.device, precision: str, tf32: bool = True, name: str | None = None) -> float | None:
    """Peak FLOP/s of one device for train.precision (bf16 / bf16_pure: bf16; fp32: tf32 when allowed).
    None on CPU and on GPUs not in :data:`PEAK_TFLOPS` (MFU is then logged as null)."""
    if device.type != "cuda" and name is None:
        return None
    name = name if name is not None else torch.cuda.get_device_name(device)
    kind = "bf16" if precision.startswith("bf16") else "tf32" if tf32 else "fp32"
    for gpu in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(part in name for part in gpu.split()):
            return PEAK_TFLOPS[gpu][kind] * 1e12
    return None


def throughput(tokens: float, seconds: float, world: int, flops_per_token: float, peak: float | None) -> dict:
    """The throughput fields of a train line for ``tokens`` trained in ``seconds`` over ``world`` devices."""
    tps = tokens / seconds
    per_device = tps / world
    return {"tokens_per_s": tps, "tokens_per_s_per_device": per_device, "tflops": tps * flops_per_token / 1e12,
            "tflops_per_device": per_device * flops_per_token / 1e12,
            "mfu": per_device * flops_per_token / peak if peak else None}


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a run that died after its last checkpoint logged them)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill; the resumed run rewrites that step
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Writes metrics on the main rank; every other rank holds a no-op logger."""

    def __init__(self, run_dir: Path, enabled: bool, config: dict, resume_step: int | None,
                 wandb_mode: str = "disabled", wandb_project: str = "amllm", run_name: str | None = None,
                 wandb_id: str | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif self.path.exists() and self.path.stat().st_size:
            # A fresh start over an old file (no checkpoint to resume): keep the old one aside.
            os.replace(self.path, self.path.with_name(f"metrics.{int(time.time())}.jsonl.bak"))
        self._f = open(self.path, "a", buffering=1)
        if wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise RuntimeError("log.wandb is set but wandb is not installed; pip install 'amllm[wandb]' "
                                   "or set log.wandb=disabled") from None
            self.wandb_id = wandb_id or uuid.uuid4().hex[:8]  # kept in checkpoints: resume = same run
            self.wandb = wandb.init(project=wandb_project, name=run_name, id=self.wandb_id, resume="allow",
                                    mode=wandb_mode, dir=str(run_dir), config=config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.wandb.log(flat, step=int(record["step"]))

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self.wandb is not None:
            self.wandb.finish()
