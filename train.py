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
import signal
import sys
import time
from pathlib import Path

import torch

from amllm.cli import require_trainer_dependencies

require_trainer_dependencies()  # an optimizer-only install (pip install amllm) lacks the trainer's packages
from amllm import checkpoint as ckpt  # noqa: E402
from amllm import fault_injection, guard, rundir
from amllm.checkpoint import Checkpointer
from amllm.config import ConfigError, load_config
from amllm.data import BatchSampler, DataError, load_shards, load_tokenizer, prepare, shard_dir, val_batches
from amllm.data.device import DeviceInputs
from amllm.debug import no_host_reads
from amllm.evaluate import evaluate
from amllm.metrics import MetricsLogger, beta_stats, peak_flops, throughput
from amllm.model import build_model, config_fingerprint, count_params, flops_per_token, load_llama_config
from amllm.optim_factory import last_beta
from amllm.parallel import distributed as D
from amllm.parallel.backend import make_backend
from amllm.parallel.blocks import COMPILE_ERRORS, compile_error_line
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
    rundir.check_output_dir(run_dir)  # nothing is written into run_dir until every input is validated

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

    # ---- resume: any checkpoint of this model, from any backend and world size (amllm/checkpoint.py) ------
    meta_now = {"model_fingerprint": config_fingerprint(hf_config), "model": cfg.model.name,
                "tokenizer_fingerprint": tokenizer.fingerprint, "optimizer": cfg.optim.name,
                "world_size": info.world_size, "backend": cfg.parallel.backend,
                "data_fingerprint": ckpt.manifest_fingerprint(manifest)}
    checkpointer = Checkpointer(cfg, info, backend, run_dir, meta_now)
    resumed = checkpointer.resume(sampler) or {}  # model, optimizer, sampler, this rank's RNG; {}: a fresh start
    resume_from = resumed.get("path")
    start_step, tokens_seen = resumed.get("step", 0), resumed.get("tokens", 0)
    skipped, wandb_id = resumed.get("skipped_steps", 0), resumed.get("wandb_id") or None
    if is_main and resumed:
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

    if cfg.train.compile:  # compile the evaluation path now: a problem stops the run here, not at its first eval
        evaluate(model, val[:1], device, autocast, lockstep=backend.lockstep_eval)

    rundir.claim_run_dir(cfg, run_dir, is_main, rundir.checkpoint_bytes(backend.raw_model, cfg.optim.name))
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

    # ---- the training loop -------------------------------------------------------------------------
    stop = StopRequest()  # SIGTERM / SIGINT: finish the step, checkpoint, exit with PREEMPTED_EXIT
    progress = Progress(is_main and cfg.log.progress, start_step, total_steps)
    # NaN/inf loss or gradient: the update is skipped on the device; at checks: stop | skip (amllm/guard.py)
    nonfinite = guard.NonFiniteGuard(cfg.train.nonfinite, device, skipped, first_step=start_step)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    to_device = DeviceInputs(device)
    peak = peak_flops(device, cfg.train.precision, cfg.train.tf32)  # for MFU; None on CPU
    fault_injection.install(backend.raw_model, sampler, info.rank, run_dir)  # tests only: no-op unless asked
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
            for i, (x, y) in enumerate(micro_batches):
                with backend.micro_step(last=i == accum - 1), autocast:
                    loss = model(input_ids=x, targets=y)  # the mean next-token loss (chunked: train.loss_chunk)
                backend.backward(loss, accum)
                loss_sum += loss.detach()
            # clip, guard (one all-reduce of the flags: non-finite loss/gradient, stop wish), update, zero grads
            grad_norm = backend.optimizer_step(loss_sum, nonfinite, stop=stop.requested(done))
        tokens_seen += tokens_per_step
        if checks:
            nonfinite.check(done)  # the host read: skip warnings, or NonFiniteError (stop mode); the agreed stop

        if logs:
            loss_avg = D.all_reduce_sum_(loss_sum / accum) / info.world_size
            loss_val = loss_avg.item()
            now = time.perf_counter()
            speed = throughput(tokens_per_step * (done - last_logged), now - t_last, info.world_size, flops_tok, peak)
            t_last, last_logged = now, done
            rec = {"kind": "train", "step": done, "tokens": tokens_seen, "loss": loss_val, "lr": lr,
                   "grad_norm": backend.grad_norm(grad_norm),
                   **beta_stats(last_beta(optimizer)),
                   **speed, "skipped_steps": nonfinite.skipped, "time": time.time()}
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
        if saves or nonfinite.stop_requested:  # a stop agreed by all ranks: one save, also on a cadence step
            checkpointer.save(done, {"tokens": tokens_seen, "sampler": sampler.state_dict(),
                                     "skipped_steps": nonfinite.skipped, "wandb_id": logger.wandb_id or ""})
        t_last += time.perf_counter() - paused
        if nonfinite.stop_requested and not last:
            progress.close()
            logger.close()
            if is_main:
                print(f"stopped at step {done} ({stop.why or 'another rank was signalled'}); checkpoint saved, run the same command to resume")
            rundir.release_run_dirs()
            return D.finish(PREEMPTED_EXIT)

    progress.close()
    logger.close()
    if is_main:
        (run_dir / "DONE").touch()
        print(f"done: {run_dir}")
    rundir.release_run_dirs()
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


def run_cli(argv=None) -> int:
    """main() with user errors printed as one line (exit status 2) instead of a traceback."""
    try:
        return main(argv)
    except (ConfigError, DataError, ckpt.CheckpointError, guard.NonFiniteError) as e:
        rundir.release_run_dirs()
        print(f"error: {e}", file=sys.stderr)
        return D.finish(SAVE_FAILED_EXIT if isinstance(e, ckpt.CheckpointSaveError) else
                        NONFINITE_EXIT if isinstance(e, guard.NonFiniteError) else 2, sync=False)
    except COMPILE_ERRORS as e:  # at start-up (the eval path is compiled before step 1) or at the first step
        rundir.release_run_dirs()
        print(f"error: {compile_error_line(e)}", file=sys.stderr)
        return D.finish(2, sync=False)


if __name__ == "__main__":
    sys.exit(run_cli())
