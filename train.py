"""Pretrain a LLaMA model with AdamW or the Adaptive Memory optimizers. Read it top to bottom.

    python train.py                                   # the default job: tiny LLaMA, embedded corpus, CPU
    python train.py --config configs/c4/llama_60m_am_adamw.yaml optim.lr=2e-3
    torchrun --nproc_per_node 8 train.py --config ...  # DDP (one or many nodes)
    torchrun ... train.py --config ... parallel.backend=fsdp2
    deepspeed --num_gpus 8 train.py --config ... parallel.backend=deepspeed \
        parallel.deepspeed_config=configs/deepspeed/zero2_bf16.json
    python train.py --config ... --eval-only          # validation loss of the latest checkpoint

Overrides are `section.key=value` (see amllm/config.py for every key). A run directory holds
config.yaml, metrics.jsonl and step-N/ checkpoints; starting again with the same run_dir resumes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from amllm.cli import require_trainer_dependencies

require_trainer_dependencies()  # an optimizer-only install (pip install amllm) lacks the trainer's packages
from amllm import checkpoint as ckpt  # noqa: E402
from amllm import faults
from amllm.config import ConfigError, load_config, save_config
from amllm.data import BatchSampler, DataError, load_shards, load_tokenizer, prepare, shard_dir, val_batches
from amllm.data.device import DeviceInputs
from amllm.debug import no_host_reads
from amllm.evaluate import evaluate
from amllm.metrics import MetricsLogger, beta_stats, peak_flops, throughput
from amllm.model import build_model, config_fingerprint, count_params, flops_per_token, load_llama_config
from amllm.optim_factory import last_beta
from amllm.parallel import distributed as D
from amllm.parallel.backend import check_resumable, make_backend
from amllm.schedule import lr_at


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults give the CPU demo job")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint to resume from, then exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=3e-3")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    total_steps = cfg.total_steps()

    # ---- processes, devices, precision -------------------------------------------------------
    info = D.init_distributed(cfg.train.device, deepspeed=cfg.parallel.backend == "deepspeed")
    device, is_main = info.device, info.is_main
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda" and cfg.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    backend = make_backend(cfg, info)  # ddp (also 1 process) | fsdp2 | deepspeed: amllm/parallel/backend.py
    autocast = backend.autocast()

    run_dir = Path(cfg.run_dir)
    faults.check_output_dir(run_dir)  # nothing is written into run_dir until every input is validated

    # ---- data: rank 0 tokenizes (once, cached), everyone memory-maps -----------------------------
    # the others wait on a side group with data.prepare_timeout_s (not NCCL's 30 min), or get rank 0's error
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
    accum = cfg.train.batch_size // info.world_size // cfg.train.micro_batch_size  # micro-steps per step
    val = val_batches(val_data, cfg.data.seq_len, cfg.eval.tokens, cfg.eval.micro_batch_size,
                      rank=info.rank, world=info.world_size)

    # ---- model and optimizer -----------------------------------------------------------------------
    hf_config = load_llama_config(cfg.model, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                                  seq_len=cfg.data.seq_len)
    model = build_model(hf_config, seed=cfg.train.seed, loss_chunk=cfg.train.loss_chunk,
                        attention=cfg.model.attn_implementation)
    n_params = count_params(model)
    flops_tok = flops_per_token(hf_config, n_params["non_embedding"], cfg.data.seq_len)
    if cfg.train.precision == "bf16_pure":
        model = model.to(torch.bfloat16)  # the paper's harness: bf16 weights; AM statistics stay fp32
    model = model.to(device)
    # activation checkpointing, per-block compile, then wrapping (DDP / fully_shard / DeepSpeed engine); the optimizer
    backend.setup(model)
    model, optimizer = backend.model, backend.am_optimizer

    # ---- resume ------------------------------------------------------------------------------------
    meta_now = {"model_fingerprint": config_fingerprint(hf_config), "model": cfg.model.name,
                "tokenizer_fingerprint": tokenizer.fingerprint, "optimizer": cfg.optim.name,
                "world_size": info.world_size, "backend": cfg.parallel.backend,
                "data_fingerprint": ckpt.manifest_fingerprint(manifest)}
    start_step, tokens_seen, wandb_id, skipped = 0, 0, None, 0
    resume_from = find_resume(cfg, run_dir, meta_now)
    if resume_from is not None:
        check_resumable(ckpt.read_meta(resume_from), backend, info.world_size, resume_from)
        trainer_state = load_checkpoint(resume_from, backend, optimizer, cfg.optim.name, cfg.checkpoint.allow_changes)
        start_step, tokens_seen = trainer_state["step"], trainer_state["tokens"]
        skipped = trainer_state.get("skipped_steps", 0)
        if "data" in cfg.checkpoint.allow_changes:
            sampler.step = int(trainer_state["sampler"]["step"])  # another data manifest: position only
        else:
            sampler.load_state_dict(trainer_state["sampler"])
        ckpt.restore_rng(resume_from, info.rank, device, trainer_state)  # this rank's own RNG states
        wandb_id = trainer_state.get("wandb_id") or None
        if is_main:
            print(f"resumed from {resume_from} (step {start_step}, {tokens_seen:,} tokens)")

    if args.eval_only:
        if resume_from is None:
            raise ckpt.CheckpointError(f"--eval-only: no complete step-N/ checkpoint in {run_dir} "
                                       f"(or checkpoint.resume=never); train first or give checkpoint.resume=PATH")
        result = evaluate(model, val, device, autocast, lockstep=backend.lockstep_eval)
        if is_main:
            print(f"step {start_step}: val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}  "
                  f"({result['val_tokens']:,} tokens)")
        return D.finish(0)

    faults.claim_run_dir(cfg, run_dir, is_main, faults.checkpoint_bytes(backend.raw_model, cfg.optim.name))
    logger = MetricsLogger(run_dir, is_main, cfg.to_dict(), resume_step=start_step if resume_from else None,
                           wandb_mode=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                           run_name=cfg.log.run_name or run_dir.name, wandb_id=wandb_id)
    if is_main:
        print(f"model {cfg.model.name}: {n_params['total'] / 1e6:.2f}M parameters "
              f"({n_params['non_embedding'] / 1e6:.2f}M non-embedding), {flops_tok / 1e6:.1f} MFLOPs/token | "
              f"{info.world_size} rank(s) x {accum} micro-batch(es) of {cfg.train.micro_batch_size} x "
              f"{cfg.data.seq_len} | {total_steps} steps, {total_steps * cfg.train.batch_size * cfg.data.seq_len:,} "
              f"tokens | {cfg.optim.name} lr {cfg.optim.lr} warmup {cfg.schedule.warmup_steps} | {device} "
              f"{cfg.train.precision}")

    def save(step: int) -> None:
        state = {"step": step, "tokens": tokens_seen, "sampler": sampler.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "wandb_id": logger.wandb_id or "", "skipped_steps": guard.skipped,
                 "optim_hparams": ckpt.optimizer_hparams(optimizer)}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)

        def write(tmp: Path) -> None:
            model_state, optim_state = backend.state_for_check() if is_main else ({}, {})
            faults.check_finite_state(model_state, "parameter", step)  # never a NaN in a checkpoint
            faults.check_finite_state(optim_state, "optimizer state", step)
            backend.write(tmp, model_state or None, optim_state or None)  # every rank: sharded backends
            ckpt.save_rng(tmp, info.rank, device)  # every rank: RNG streams differ per rank
            if is_main:
                ckpt.test_pause("after-model.pt", run_dir, step)
                ckpt.save_torch(state, tmp / "trainer.pt")
                save_config(cfg, tmp / "config.yaml")

        ckpt.save_checkpoint(run_dir, step, {**meta_now, "tokens": tokens_seen}, write, is_main, cfg.checkpoint.keep)

    # ---- the training loop -------------------------------------------------------------------------
    stop = StopRequest()  # SIGTERM / SIGINT: finish the step, checkpoint, exit with PREEMPTED_EXIT
    progress = Progress(is_main and cfg.log.progress, start_step, total_steps)
    # NaN/inf loss or gradient: the update is skipped on the device; at checks: stop | skip (faults.py)
    guard = faults.NonFiniteGuard(cfg.train.nonfinite, device, skipped, first_step=start_step)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    to_device = DeviceInputs(device)
    peak = peak_flops(device, cfg.train.precision, cfg.train.tf32)  # for MFU; None on CPU
    model.train()
    t_last, last_logged = time.perf_counter(), start_step
    for step in range(start_step, total_steps):
        done = step + 1
        last = done == total_steps
        logs = done % cfg.log.every == 0 or last
        evals = bool(cfg.eval.every and done % cfg.eval.every == 0) or last
        saves = bool(cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or last
        checks = logs or evals or saves or done % cfg.train.check_every == 0  # the steps that read flags
        lr = lr_at(step, cfg.optim.lr, total_steps, cfg.schedule)
        backend.set_lr(lr)

        # a step that does none of the above reads nothing back from the device (train.sync_debug checks it)
        with no_host_reads(device, cfg.train.sync_debug and not checks and step >= start_step + 2):
            # forward/backward over this rank's micro-batches; gradients are synced on the last one only
            loss_sum = torch.zeros((), device=device)
            micro_batches = to_device(sampler.next_batch())  # CUDA: pinned, copied on a side stream; CPU: as is
            faults.crash_hook(done, info.rank, run_dir)  # test hook (a lost rank); no-op unless set
            for i, (x, y) in enumerate(micro_batches):
                with backend.micro_step(last=i == accum - 1), autocast:
                    loss = model(input_ids=x, targets=y)  # the mean next-token loss (chunked: train.loss_chunk)
                    loss = faults.poison_loss(loss, done, info.rank)  # test hook
                backend.backward(loss, accum)
                loss_sum += loss.detach()
            # clip, guard (one all-reduce of the flags: non-finite loss/gradient, stop wish), update, zero grads
            grad_norm = backend.optimizer_step(loss_sum, guard, stop=stop.requested(done))
        tokens_seen += tokens_per_step
        if checks:
            guard.check(done)  # the host read: skip warnings, or NonFiniteError (stop mode); the agreed stop

        if logs:
            loss_avg = D.all_reduce_sum_(loss_sum / accum) / info.world_size
            loss_val = loss_avg.item()
            now = time.perf_counter()
            speed = throughput(tokens_per_step * (done - last_logged), now - t_last, info.world_size, flops_tok, peak)
            t_last, last_logged = now, done
            rec = {"kind": "train", "step": done, "tokens": tokens_seen, "loss": loss_val, "lr": lr,
                   "grad_norm": backend.grad_norm(grad_norm),
                   **beta_stats(last_beta(optimizer)),
                   **speed, "skipped_steps": guard.skipped, "time": time.time()}
            fallbacks = getattr(optimizer, "fallback_count", None)
            if fallbacks is not None:
                rec["beta_fallbacks"] = int(fallbacks.item())
            logger.log(rec)
            progress.update(done, rec)

        if (evals or saves) and device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels finish inside the training time
        paused = time.perf_counter()  # evaluation and checkpoint time is kept out of tokens/s and MFU
        if evals:
            result = evaluate(model, val, device, autocast, lockstep=backend.lockstep_eval)
            logger.log({"kind": "eval", "step": done, "tokens": tokens_seen, **result, "time": time.time()})
            progress.write(f"step {done}: val_loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.1f})")
        if saves or guard.stop_requested:  # a stop agreed by all ranks: one save, also on a cadence step
            save(done)
        t_last += time.perf_counter() - paused
        if guard.stop_requested and not last:
            progress.close()
            logger.close()
            if is_main:
                print(f"stopped at step {done} ({stop.why or 'another rank was signalled'}); checkpoint saved, run the same command to resume")
            faults.release_run_dirs()
            return D.finish(PREEMPTED_EXIT)

    progress.close()
    logger.close()
    if is_main:
        (run_dir / "DONE").touch()
        print(f"done: {run_dir}")
    faults.release_run_dirs()
    return D.finish(0)


# ---- helpers kept out of the loop's way ------------------------------------------------------------

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "stopped early, checkpoint written, run again to resume"
NONFINITE_EXIT = 3  # train.nonfinite=stop: a NaN/inf loss or gradient; nothing new saved
SAVE_FAILED_EXIT = 74  # EX_IOERR: a checkpoint could not be written (disk full...); the previous one is intact


class StopRequest:
    """Turns SIGTERM (SLURM pre-emption, torchrun shutting down) and SIGINT (Ctrl-C) into a flag the
    loop checks after each step. AMLLM_TEST_STOP_AT_STEP=N requests a stop after step N (tests)."""

    def __init__(self):
        self.why = ""
        self._at = int(os.environ.get("AMLLM_TEST_STOP_AT_STEP", "0"))
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



def find_resume(cfg, run_dir: Path, meta_now: dict) -> Path | None:
    """The checkpoint to resume from (checkpoint.resume = auto | never | path), checked for
    compatibility: another model, tokenizer, optimizer or data is refused with what differs
    (checkpoint.allow_changes accepts the last two). Auto skips a corrupt latest with a warning."""
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":  # rank 0 looks, every rank uses its answer (or its error)
        found = None
        if faults.is_main_rank():
            try:
                found = ckpt.latest_checkpoint(run_dir, validate=ckpt.verify_files, refuse_if_all_damaged=True)
            except ckpt.CheckpointError as e:
                found = e
        found = D.broadcast_object(found)
        if isinstance(found, ckpt.CheckpointError):
            raise found
    else:
        found = Path(cfg.checkpoint.resume)
        if not found.is_dir():
            raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r} is not a directory; "
                              f"give a step-N/ path, auto or never")
    if found is None:
        return None
    meta = ckpt.read_meta(found)
    for note in ckpt.check_compatible(found, meta, meta_now, cfg.checkpoint.allow_changes):
        faults.say(f"[checkpoint] {note}")
    if meta.get("world_size", meta_now["world_size"]) != meta_now["world_size"]:
        faults.say(f"[checkpoint] {found} was saved on {meta['world_size']} rank(s), resuming on "
                   f"{meta_now['world_size']}: the same global batches, summed in another order")
    return found


def load_checkpoint(path: Path, backend, optimizer: torch.optim.Optimizer, optim_name: str, allow=()) -> dict:
    """Model and optimizer through the backend (its own file layout), then the trainer state. Changed
    optimizer hyper-parameters are refused (or, when allowed, re-applied after the load) on every
    backend: trainer.pt holds the saved ones, whatever layout the optimizer state has."""
    same_optimizer = ckpt.read_meta(path).get("optimizer", optim_name) == optim_name
    trainer_state = ckpt.load_torch(path / "trainer.pt")
    fresh = ckpt.optimizer_hparams(optimizer)
    diffs = ckpt.check_hparams(fresh, trainer_state.get("optim_hparams", []), allow, path) if same_optimizer else []

    def load_optimizer(state) -> None:
        """`state`: the optimizer state dict, or a zero-argument function that reads it."""
        if not same_optimizer:  # allowed by checkpoint.allow_changes: a fresh optimizer state
            return
        try:
            state = state() if callable(state) else state
        except ckpt.CheckpointError as e:
            if "optimizer" not in allow:
                raise
            faults.say(f"[checkpoint] {e}; the optimizer state starts fresh (checkpoint.allow_changes=[optimizer])")
            return
        if "optim_hparams" in trainer_state:
            optimizer.load_state_dict(state)
        else:  # a checkpoint older than optim_hparams: compare with the optimizer file's own groups
            for note in ckpt.load_optimizer_state(optimizer, state, allow, path / "optimizer.pt"):
                faults.say(f"[checkpoint] {note}")

    backend.read(path, load_optimizer)
    for note in ckpt.apply_hparams(optimizer, fresh, diffs):
        faults.say(f"[checkpoint] {note}")
    return trainer_state


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


def run_cli(argv=None) -> int:
    """main() with user errors printed as one line (exit status 2) instead of a traceback."""
    try:
        return main(argv)
    except (ConfigError, DataError, ckpt.CheckpointError, faults.NonFiniteError) as e:
        faults.release_run_dirs()
        print(f"error: {e}", file=sys.stderr)
        return D.finish(SAVE_FAILED_EXIT if isinstance(e, ckpt.CheckpointSaveError) else
                        NONFINITE_EXIT if isinstance(e, faults.NonFiniteError) else 2, sync=False)


if __name__ == "__main__":
    sys.exit(run_cli())
