"""Pretrain a LLaMA model with AdamW or the Adaptive Memory optimizers. Read it top to bottom.

    python train.py                                   # the default job: tiny LLaMA, embedded corpus, CPU
    python train.py --config configs/c4/llama_60m_am_adamw_nowarmup.yaml optim.lr=2e-3
    torchrun --nproc_per_node 8 train.py --config ...  # DDP (one or many nodes)
    torchrun ... train.py --config ... parallel.backend=fsdp2
    deepspeed --num_gpus 8 train.py --config ... parallel.backend=deepspeed \
        parallel.deepspeed_config=configs/deepspeed/zero2_bf16.json
    python train.py --config ... --eval-only          # validation loss of the latest checkpoint

Recipes: configs/c4/*.yaml (the paper's grid) and configs/cpu/*.yaml. Overrides are `section.key=value`
(see amllm/config.py for every key). A run directory holds config.yaml, metrics.jsonl and step-N/
checkpoints; starting again with the same run_dir resumes. The package map: docs/architecture.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from amllm.cli import require_trainer_dependencies

require_trainer_dependencies()  # an optimizer-only install (pip install amllm) lacks the trainer's packages
from amllm import checkpoint as ckpt  # noqa: E402
from amllm import distributed as D
from amllm import fault_injection, guard, rundir
from amllm.checkpointer import Checkpointer
from amllm.config import ConfigError, load_config
from amllm.data import DataError
from amllm.data.device import DeviceInputs
from amllm.debug import no_host_reads
from amllm.evaluate import evaluate
from amllm.metrics import MetricsLogger, peak_flops, throughput
from amllm.model import build_model, count_params, flops_per_token, load_llama_config
from amllm.parallel.backend import make_backend
from amllm.parallel.blocks import COMPILE_ERRORS, compile_error_line
from amllm.schedule import lr_at
from amllm.trainer import (NONFINITE_EXIT, PREEMPTED_EXIT, SAVE_FAILED_EXIT, Cadence, Progress, StopRequest, banner,
                           beta_fields, eval_only, finish, load_data, run_identity, set_numerics)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (configs/c4/*.yaml, configs/cpu/*.yaml); defaults give the CPU demo job")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint to resume from, then exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=3e-3")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    total_steps = cfg.total_steps()
    # ---- processes, devices, data: rank 0 tokenizes (once, cached), every rank memory-maps its batches ------
    info = D.init_distributed(cfg.train.device, cfg.parallel.backend == "deepspeed", cfg.parallel.dist_backend,
                              cfg.parallel.timeout_s)  # joins within parallel.timeout_s, or one line and exit 69
    device = set_numerics(cfg, info.device)  # threads, TF32
    backend = make_backend(cfg, info)  # ddp (also 1 process) | fsdp2 | deepspeed: amllm/parallel/
    autocast = backend.autocast()
    run_dir = Path(cfg.run_dir)
    rundir.check_output_dir(run_dir)  # nothing is written into run_dir until every input is validated
    data = load_data(cfg, info)
    sampler, val, accum = data.sampler, data.val, data.accum

    # ---- model and optimizer -----------------------------------------------------------------------------
    hf_config = load_llama_config(cfg.model, vocab_size=data.tokenizer.vocab_size, eos_id=data.tokenizer.eos_id,
                                  seq_len=cfg.data.seq_len)
    model = build_model(hf_config, seed=cfg.train.seed, loss_chunk=cfg.train.loss_chunk,
                        attention=cfg.model.attn_implementation)
    n_params = count_params(model)  # total, non-embedding; FLOPs per token: 6N + attention (for MFU)
    flops_tok = flops_per_token(hf_config, n_params["non_embedding"], cfg.data.seq_len)
    if cfg.train.precision == "bf16_pure":
        model = model.to(torch.bfloat16)  # bf16 weights, no master copy (amllm/config.py: TrainConfig.precision)
    backend.setup(model.to(device))  # AC, per-block compile, then DDP / fully_shard / DeepSpeed's engine; the optimizer
    model, optimizer = backend.model, backend.optimizer

    # ---- resume: any checkpoint of this model, from any backend and world size (amllm/checkpointer.py) -------
    checkpointer = Checkpointer(cfg, info, backend, run_dir, run_identity(cfg, info, hf_config, data))
    resumed = checkpointer.resume(sampler) or {}  # model, optimizer, sampler, this rank's RNG; {}: a fresh start
    start_step, tokens_seen = resumed.get("step", 0), resumed.get("tokens", 0)
    if args.eval_only:
        return eval_only(backend, val, resumed, run_dir)
    if cfg.train.compile:  # compile the evaluation path now: a problem stops the run here, not at its first eval
        evaluate(model, val[:1], device, autocast, lockstep=backend.lockstep_eval)
    rundir.claim_run_dir(cfg, run_dir, info.is_main, rundir.checkpoint_bytes(backend.raw_model, cfg.optim.name))
    logger = MetricsLogger(run_dir, info.is_main, cfg.to_dict(), resume_step=start_step if resumed else None,
                           wandb_mode=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                           run_name=cfg.log.run_name or run_dir.name, wandb_id=resumed.get("wandb_id") or None)
    banner(cfg, info, n_params, flops_tok, accum, total_steps)

    # ---- the training loop -------------------------------------------------------------------------------
    stop = StopRequest()  # SIGTERM / SIGINT: finish the step, checkpoint, exit with PREEMPTED_EXIT
    progress = Progress(info.is_main and cfg.log.progress, start_step, total_steps)
    # NaN/inf loss or gradient: the update is skipped on the device; at checks: stop | skip (amllm/guard.py)
    nonfinite = guard.NonFiniteGuard(cfg.train.nonfinite, device, resumed.get("skipped_steps", 0), first_step=start_step)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    to_device, peak = DeviceInputs(device), peak_flops(device, cfg.train.precision, cfg.train.tf32)  # MFU: None on CPU
    fault_injection.install(backend.raw_model, sampler, info.rank, run_dir)  # tests only: no-op unless asked
    model.train()
    t_last, last_logged = time.perf_counter(), start_step
    for step in range(start_step, total_steps):
        done = step + 1
        cadence = Cadence.at(cfg, done, total_steps)  # logs / evals / saves / checks (the steps that read flags)
        lr = lr_at(step, cfg.optim.lr, total_steps, cfg.schedule)
        backend.set_lr(lr)

        # a step that does none of the above reads nothing back from the device (train.sync_debug checks it)
        with no_host_reads(device, cfg.train.sync_debug and not cadence.checks and step >= start_step + 2):
            # forward/backward over this rank's micro-batches; gradients are synced on the last one only
            loss_sum = torch.zeros((), device=device)
            micro_batches = to_device(sampler.next_batch())  # CUDA: pinned, copied on a side stream; CPU: as is
            for i, (x, y) in enumerate(micro_batches):
                with backend.micro_step(last=i == accum - 1), autocast:
                    loss = model(input_ids=x, targets=y)  # the mean next-token loss (chunked: train.loss_chunk)
                backend.backward(loss, accum)
                loss_sum += loss.detach()
            # clip, guard (one all-reduce of the flags: non-finite loss/gradient, stop wish), update, zero grads
            backend.optimizer_step(loss_sum, nonfinite, stop=stop.requested(done))
        tokens_seen += tokens_per_step
        if cadence.checks:
            nonfinite.check(done)  # the host read: skip warnings, or NonFiniteError (stop mode); the agreed stop

        if cadence.logs:
            loss_avg = D.all_reduce_sum_(loss_sum / accum) / info.world_size
            now = time.perf_counter()
            speed = throughput(tokens_per_step * (done - last_logged), now - t_last, info.world_size, flops_tok, peak)
            t_last, last_logged = now, done
            rec = {"kind": "train", "step": done, "tokens": tokens_seen, "loss": loss_avg.item(), "lr": lr,
                   "grad_norm": backend.grad_norm(), **beta_fields(optimizer), **speed,
                   "skipped_steps": nonfinite.skipped, "time": time.time()}
            logger.log(rec)
            progress.update(done, rec)

        if (cadence.evals or cadence.saves) and device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels finish inside the training time
        paused = time.perf_counter()  # evaluation and checkpoint time is kept out of tokens/s and MFU
        if cadence.evals:
            result = evaluate(model, val, device, autocast, lockstep=backend.lockstep_eval)
            logger.log({"kind": "eval", "step": done, "tokens": tokens_seen, **result, "time": time.time()})
            progress.write(f"step {done}: val_loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.1f})")
        if cadence.saves or nonfinite.stop_requested:  # a stop agreed by all ranks: one save, also on a cadence step
            checkpointer.save(done, {"tokens": tokens_seen, "sampler": sampler.state_dict(),
                                     "skipped_steps": nonfinite.skipped, "wandb_id": logger.wandb_id or ""})
        t_last += time.perf_counter() - paused
        if nonfinite.stop_requested and not cadence.last:
            why = stop.why or "another rank was signalled"
            return finish(PREEMPTED_EXIT, run_dir, progress, logger,
                          f"stopped at step {done} ({why}); checkpoint saved, run the same command to resume")
    return finish(0, run_dir, progress, logger, f"done: {run_dir}")


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
    except Exception as e:  # a peer unreachable at the join, or lost mid-run (a host died): one line, exit 69
        if (lost := D.as_peer_error(e)) is None:
            raise
        rundir.release_run_dirs()
        print(f"error: {lost}", file=sys.stderr)
        return D.finish(D.PEER_EXIT, sync=False)


if __name__ == "__main__":
    sys.exit(run_cli())
