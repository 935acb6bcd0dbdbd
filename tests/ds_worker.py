"""Rank workers of the DeepSpeed tests (spawned; one spawn runs several cases to pay the start once)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.dist_cases import (CLIP, GLOBAL_BATCH, LRS, MICRO, as_llama_lm, eval_batch, micro_batches, param_groups,
                              setup_env, step_loss, tiny_llama)


def ds_config(stage: int, sub_group_size: int | None = None, fp32_accum: bool = False, offload: bool = False) -> dict:
    """A DeepSpeed JSON leaving batch sizes, clipping and bf16 to the trainer config ("auto")."""
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if sub_group_size:
        zero["sub_group_size"] = sub_group_size
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": zero,
          "bf16": {"enabled": "auto"}}
    if fp32_accum:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def trainer_config(bf16: bool, compile: bool = False):
    from amllm.config import config_from_dict

    return config_from_dict({"train": {"batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO,
                                       "precision": "bf16" if bf16 else "fp32", "compile": compile},
                             "optim": {"grad_clip": CLIP}, "parallel": {"backend": "deepspeed",
                                                                        "deepspeed_config": "unused.json"}})


def make_engine(case: dict):
    from amllm.optim import AMAdamW
    from amllm.parallel.deepspeed_backend import build_engine

    model = tiny_llama(layers=case.get("layers", 2))
    if case.get("loss_chunk"):
        model = as_llama_lm(model, case["loss_chunk"])
    if case.get("ac"):  # before the engine, as DeepSpeedBackend.setup does
        from amllm.parallel.blocks import apply_ac

        apply_ac(model, case["ac"], case.get("ac_every", 2))
    groups = model.parameters() if case.get("one_group") else param_groups(model)
    opt = AMAdamW(groups, lr=LRS[0], betas=(0.9, 0.99), per_layer=case.get("per_layer", False))
    ds = ds_config(case["stage"], case.get("sub_group_size"), case.get("fp32_accum", False), case.get("offload", False))
    engine = build_engine(model, opt, trainer_config(case.get("bf16", False), case.get("compile", False)), ds_config=ds)
    if case.get("naive"):
        # negative control: step at each of DeepSpeed's per-group calls (reducing over the DP group
        # each time) -> a per-group β, what the deferral exists to prevent
        engine.basic_optimizer._defer = False
    return engine


def train_steps(engine, steps, rank, world) -> dict:
    import torch.distributed as dist

    from amllm.parallel.deepspeed_backend import am_optimizer, set_lr

    out = {"loss": [], "beta": [], "sums": [], "n_calls": []}
    for step in steps:
        set_lr(engine, LRS[step])
        total = torch.zeros(())
        for ids in micro_batches(step, rank, world):
            loss = step_loss(engine, ids)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            total += loss.detach().float()
        dist.all_reduce(total)
        am = am_optimizer(engine)
        out["loss"].append(total.item() / (world * len(micro_batches(step, rank, world))))
        out["beta"].append(am.last_beta.detach().double().clone())
        out["sums"].append(am.last_sums[:, :4].detach().double().clone())
        from tests.torch_dist_worker import _compiled_graphs

        out.setdefault("graphs", []).append(_compiled_graphs())
    return out


def eval_loss(engine) -> float:
    with torch.no_grad():
        return engine(input_ids=eval_batch(), labels=eval_batch()).loss.float().item()


def poison_zero3_padding(ds_opt) -> int:
    """Fill the per-parameter padding of ZeRO-3's fp32 flats with NaN, as uninitialised memory
    may be (computed here from ds_numel, independently of the adapter). Returns the count."""
    rank = torch.distributed.get_rank()
    n = 0
    for s, flat in enumerate(ds_opt.fp32_partitioned_groups_flat):
        off = 0
        for p, part in zip(ds_opt.fp16_groups[s], ds_opt.fp16_partitioned_groups[s]):
            real = max(0, min(p.ds_numel - rank * part.ds_numel, part.ds_numel))
            flat.data[off + real: off + part.ds_numel] = float("nan")
            n += part.ds_numel - real
            off += part.ds_numel
    count = torch.tensor(n)
    torch.distributed.all_reduce(count)  # padding sits on the last rank(s): count over all
    return int(count)


def run_cases(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    setup_env(rank, world, port)
    import deepspeed

    from amllm import checkpoint as ckpt
    from amllm.parallel import deepspeed_backend as dsb
    from amllm.parallel.zero_adapter import ZeroAMAdapter

    deepspeed.init_distributed(dist_backend=None)
    results = {}
    for case in cases:
        name = case["name"]
        n_steps = case.get("steps", 4)
        orig_bind = ZeroAMAdapter.bind
        if case.get("poison_padding"):
            def bind(self, ds_opt, _orig=orig_bind):
                case["_poisoned"] = poison_zero3_padding(ds_opt)
                _orig(self, ds_opt)

            ZeroAMAdapter.bind = bind
        if case.get("nccl_like_dp"):
            # the adapter sees a data-parallel group with no CPU backend, as NCCL is, while DeepSpeed's
            # own collectives keep the gloo group (its engine cannot run on a CUDA-only group on a CPU)
            cuda_only = torch.distributed.new_group(backend="cuda:gloo")

            def bind(self, ds_opt, _orig=orig_bind):
                real = ds_opt.real_dp_process_group
                ds_opt.real_dp_process_group = [cuda_only] * len(real)
                try:
                    _orig(self, ds_opt)
                finally:
                    ds_opt.real_dp_process_group = real

            ZeroAMAdapter.bind = bind
        try:
            engine = make_engine(case)
        except Exception as e:  # a refusal the test expects
            if not case.get("expect_error"):
                raise
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        finally:
            ZeroAMAdapter.bind = orig_bind
        res = {"engine_optimizer": type(engine.optimizer).__name__}
        ds_opt = engine.optimizer
        res["n_shards"] = len(getattr(engine.basic_optimizer, "_shards", []))
        res["poisoned"] = case.get("_poisoned", 0)
        am = getattr(engine.basic_optimizer, "am", None)
        res["reduce_backend"] = torch.distributed.get_backend(am.reducer) if getattr(am, "reducer", None) else None
        if case.get("resume"):
            # train k steps, save, train the rest; then a fresh engine loads and trains the rest
            k = case["resume"]
            first = train_steps(engine, range(k), rank, world)
            torch.manual_seed(1234 + rank)  # a per-rank RNG state, which must come back from the checkpoint
            dsb.save_checkpoint(engine, case["ckpt_dir"])
            ckpt.save_rng(Path(case["ckpt_dir"]), rank, torch.device("cpu"))  # the checkpointer's part
            rng_before = torch.rand(3)
            cont = train_steps(engine, range(k, n_steps), rank, world)
            res["continuous"] = {key: first[key] + cont[key] for key in first}
            res["continuous"]["eval_loss"] = eval_loss(engine)
            torch.manual_seed(999)
            engine2 = make_engine(case)
            dsb.load_checkpoint(engine2, case["ckpt_dir"])
            ckpt.restore_rng(Path(case["ckpt_dir"]), rank, torch.device("cpu"), {})
            res["rng_restored"] = bool(torch.equal(torch.rand(3), rng_before))
            resumed = train_steps(engine2, range(k, n_steps), rank, world)
            resumed["eval_loss"] = eval_loss(engine2)
            res["resumed"] = resumed
        else:
            res.update(train_steps(engine, range(n_steps), rank, world))
            from torch._dynamo.utils import counters

            res["dynamo"] = {"graph_breaks": dict(counters["graph_break"]),
                             "frames_after_step1": res["graphs"][-1] - res["graphs"][0]}
            res["eval_loss"] = eval_loss(engine)
            if hasattr(ds_opt, "_hp_optimizer_states_linked") and not case.get("per_layer"):
                from deepspeed.utils import safe_get_full_optimizer_state

                p = next(engine.module.parameters())
                exp_avg = safe_get_full_optimizer_state(p, "exp_avg")
                res["linked_exp_avg_finite"] = bool(exp_avg is not None and torch.isfinite(exp_avg).all())
        results[name] = res
        del engine
    if rank == 0:
        torch.save(results, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
