"""train.py's set-up and bookkeeping, kept out of the training loop's way. The step itself -- the
micro-batch loop, the backward, the optimizer step with its clip and guard, the cadence -- stays in
train.py, where a reader sees it.

    data = load_data(cfg, info)                  # rank 0 tokenizes, every rank memory-maps its batches
    cadence = Cadence(cfg, total_steps)          # which of logging / eval / checkpoint / checks a step does
    banner(...), eval_only(...)                  # what train.py prints; --eval-only
    finish(...)                                  # the one way a run ends (files closed, DONE, exit status)
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed as D
from . import fault_injection, rundir
from .checkpoint import CheckpointError, manifest_fingerprint
from .config import Config
from .data import BatchSampler, DataError, load_shards, load_tokenizer, prepare, shard_dir, val_batches
from .debug import sync_report
from .evaluate import evaluate
from .metrics import beta_stats, beta_term_stats
from .model import config_fingerprint

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "stopped early, checkpoint written, run again to resume"
NONFINITE_EXIT = 3  # train.nonfinite=stop: a NaN/inf loss or gradient; nothing new saved
SAVE_FAILED_EXIT = 74  # EX_IOERR: a checkpoint could not be written (disk full...); the previous one is intact


def set_numerics(cfg: Config, device: torch.device) -> torch.device:
    """CPU threads (train.threads) and, on CUDA, TF32 matmuls (train.tf32); returns ``device``."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda" and cfg.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


@dataclass
class RankData:
    """This rank's view of the data: its sampler of training batches, its validation batches."""

    tokenizer: object
    manifest: dict
    sampler: BatchSampler
    val: list
    accum: int  # micro-batches per optimizer step on this rank


def load_data(cfg: Config, info: D.DistInfo) -> RankData:
    """Rank 0 tokenizes (once, cached in data.data_dir) while the others wait on a side group with
    data.prepare_timeout_s (not NCCL's 30 minutes) or get rank 0's error; then every rank memory-maps the
    shards and takes its part of each global batch and of the validation windows."""
    D.main_first(lambda: prepare(cfg.data), "tokenizing the data", cfg.data.prepare_timeout_s, error=DataError)
    failure = None
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.data_dir)
        train_data, val_data, manifest = load_shards(shard_dir(cfg.data, tokenizer), tokenizer, cfg.data.seq_len)
    except DataError as e:
        failure = e
    D.raise_if_any_rank(failure, DataError, hint="multi-node: data.data_dir must be on a filesystem every node sees")
    sampler = BatchSampler(train_data, cfg.data.seq_len, cfg.train.batch_size, cfg.train.micro_batch_size,
                           rank=info.rank, world=info.world_size, seed=cfg.train.seed)
    val = val_batches(val_data, cfg.data.seq_len, cfg.eval.tokens, cfg.eval.micro_batch_size,
                      rank=info.rank, world=info.world_size)
    return RankData(tokenizer, manifest, sampler, val,
                    accum=cfg.train.batch_size // info.world_size // cfg.train.micro_batch_size)


def run_identity(cfg: Config, info: D.DistInfo, hf_config, data: RankData) -> dict:
    """What this run is, compared with a checkpoint's meta.json before anything is loaded."""
    return {"model_fingerprint": config_fingerprint(hf_config), "model": cfg.model.name,
            "tokenizer_fingerprint": data.tokenizer.fingerprint, "optimizer": cfg.optim.name,
            "world_size": info.world_size, "backend": cfg.parallel.backend,
            "data_fingerprint": manifest_fingerprint(data.manifest)}


@dataclass(frozen=True)
class Cadence:
    """Which periodic work a completed step ``done`` does (the last step does all of it)."""

    logs: bool  # a train line in metrics.jsonl (log.every)
    evals: bool  # validation loss (eval.every; 0: only at the end)
    saves: bool  # a checkpoint (checkpoint.every; 0: only at the end)
    checks: bool  # read the guard's flags on the host (any of the above, or train.check_every)
    last: bool

    @classmethod
    def at(cls, cfg: Config, done: int, total: int) -> "Cadence":
        last = done == total
        logs = done % cfg.log.every == 0 or last
        evals = bool(cfg.eval.every and done % cfg.eval.every == 0) or last
        saves = bool(cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or last
        return cls(logs, evals, saves, logs or evals or saves or done % cfg.train.check_every == 0, last)


def beta_fields(optimizer) -> dict:
    """The β telemetry of a train line: β (mean, min, max; per layer in per-layer runs), and how many
    layer-steps hit the C <= 0 fallback (AM optimizers; nothing for torch's), and with optim.beta_terms
    the terms β is computed from. Called on logging steps only: the host reads happen here."""
    last_beta = getattr(optimizer, "last_beta", None)
    rec = beta_stats(last_beta)
    rec.update(beta_term_stats(getattr(optimizer, "last_beta_terms", None),
                               per_layer=last_beta is not None and last_beta.ndim == 1))
    fallbacks = getattr(optimizer, "fallback_count", None)
    if fallbacks is not None:
        rec["beta_fallbacks"] = int(fallbacks.item())
    return rec


def banner(cfg: Config, info: D.DistInfo, n_params: dict, flops_tok: float, accum: int, total_steps: int) -> None:
    D.say(f"model {cfg.model.name}: {n_params['total'] / 1e6:.2f}M parameters "
          f"({n_params['non_embedding'] / 1e6:.2f}M non-embedding), {flops_tok / 1e6:.1f} MFLOPs/token | "
          f"{info.world_size} rank(s) x {accum} micro-batch(es) of {cfg.train.micro_batch_size} x "
          f"{cfg.data.seq_len} | {total_steps} steps, {total_steps * cfg.train.batch_size * cfg.data.seq_len:,} "
          f"tokens | {cfg.optim.name} lr {cfg.optim.lr} warmup {cfg.schedule.warmup_steps} | {info.device} "
          f"{cfg.train.precision}")


def eval_only(backend, val: list, resumed: dict, run_dir: Path) -> int:
    """--eval-only: the validation loss of the checkpoint just resumed, printed; the exit status."""
    if not resumed:
        raise CheckpointError(f"--eval-only: no complete step-N/ checkpoint in {run_dir} (or "
                              f"checkpoint.resume=never); train first or give checkpoint.resume=PATH")
    result = evaluate(backend.model, val, backend.info.device, backend.autocast(), lockstep=backend.lockstep_eval)
    D.say(f"step {resumed['step']}: val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}  "
          f"({result['val_tokens']:,} tokens)")
    return D.finish(0)


def finish(code: int, run_dir: Path, progress: "Progress", logger, message: str) -> int:
    """The one way a run ends: bar and metrics closed, ``DONE`` when it completed, one line, the run
    directory released, every rank leaving with ``code`` (distributed.finish)."""
    progress.close()
    logger.close()
    if code == 0 and D.is_main_rank():
        (run_dir / "DONE").touch()
    if (syncs := sync_report()) is not None:  # train.sync_debug: the syncs counted, not refused (DeepSpeed's)
        D.say(syncs)
    D.say(message)
    rundir.release_run_dirs()
    return D.finish(code)


class StopRequest:
    """Turns SIGTERM (SLURM pre-emption, torchrun shutting down) and SIGINT (Ctrl-C) into a flag the
    loop checks after each step. AMLLM_TEST_STOP_AT_STEP=N requests a stop after step N (tests)."""

    def __init__(self):
        self.why = ""
        self._at = fault_injection.stop_at_step()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.why:  # a second signal: the user insists, stop now without a checkpoint
            raise KeyboardInterrupt
        self.why = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        if self._at and step >= self._at and not self.why:
            self.why = f"AMLLM_TEST_STOP_AT_STEP={self._at}"
        return bool(self.why)


class Progress:
    """tqdm bar on rank 0 (step, loss, lr, β, tokens/s per device, MFU, ETA); silent elsewhere."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, unit="step")

    def update(self, step: int, rec: dict) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        post = {"loss": f"{rec['loss']:.3f}", "lr": f"{rec['lr']:.2e}"}
        if rec.get("beta") is not None:
            post["beta"] = f"{rec['beta']:.3f}"
        if rec.get("tokens_per_s_per_device"):
            post["tok/s/dev"] = f"{rec['tokens_per_s_per_device']:,.0f}"
        if rec.get("mfu") is not None:
            post["mfu"] = f"{100 * rec['mfu']:.1f}%"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

