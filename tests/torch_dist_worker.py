"""Rank workers of the FSDP2 / DDP tests (spawned; one spawn runs several cases)."""

from __future__ import annotations

import torch

from tests.dist_cases import (CLIP, LRS, as_llama_lm, eval_batch, micro_batches, param_groups, setup_env, step_loss,
                              tiny_llama)


def build(case: dict, world: int):
    import torch.distributed as dist

    from amllm.optim import AMAdamW

    model = tiny_llama(layers=case.get("layers", 2))
    if case.get("loss_chunk"):
        model = as_llama_lm(model, case["loss_chunk"])
    if case.get("ac") or case.get("compile"):  # before wrapping, as the backends do (amllm/parallel/blocks.py)
        from amllm.parallel.blocks import apply_ac, compile_blocks

        apply_ac(model, case.get("ac", "none"), case.get("ac_every", 2))
        if case.get("compile"):
            compile_blocks(model)
    if case["backend"] == "fsdp2":
        from amllm.parallel.fsdp import apply_fsdp2

        apply_fsdp2(model, case.get("precision", "fp32"))
        reducer = None  # automatic over the DTensor mesh
    else:
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        # DDP: every rank holds the full averaged gradient -> no reduction (the negative control
        # reduces anyway and counts every element world-size times)
        reducer = dist.group.WORLD if case.get("double_reduce") else None
    opt = AMAdamW(param_groups(model), lr=LRS[0], betas=(0.9, 0.99), per_layer=case.get("per_layer", False),
                  reducer=reducer)
    return model, opt


class CountAllReduce:
    """Counts torch.distributed.all_reduce calls (and their element counts) inside a block."""

    def __enter__(self):
        import torch.distributed as dist

        self.calls, self._orig = [], dist.all_reduce

        def counting(tensor, *a, **k):
            self.calls.append(tensor.numel())
            return self._orig(tensor, *a, **k)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_reduce = self._orig


def train_steps(model, opt, steps, rank, world, lr_scale: float = 1.0) -> dict:
    import torch.distributed as dist

    out = {"loss": [], "beta": [], "sums": [], "opt_all_reduces": []}
    for step in steps:
        for g in opt.param_groups:
            g["lr"] = LRS[step] * lr_scale
        mbs = micro_batches(step, rank, world)
        total = torch.zeros(())
        for ids in mbs:
            loss = step_loss(model, ids)
            (loss / len(mbs)).backward()  # DDP/FSDP2 average over ranks; we average over micro-steps
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        with CountAllReduce() as c:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(total)
        out["loss"].append(total.item() / (world * len(mbs)))
        out["beta"].append(opt.last_beta.detach().double().clone())
        out["sums"].append(opt.last_sums[:, :4].detach().double().clone())
        out["opt_all_reduces"].append(c.calls)
        out.setdefault("graphs", []).append(_compiled_graphs())
    from torch._dynamo.utils import counters

    out["dynamo"] = {"graph_breaks": sum(counters["graph_break"].values()),
                     "frames_after_step1": out["graphs"][-1] - out["graphs"][0]}
    with torch.no_grad():
        out["eval_loss"] = model(input_ids=eval_batch(), labels=eval_batch()).loss.item()
    return out


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_cases(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    setup_env(rank, world, port)
    import torch.distributed as dist

    from amllm.parallel.fsdp import load_dcp, save_dcp

    dist.init_process_group("gloo")
    results = {}
    for case in cases:
        model, opt = build(case, world)
        lr_scale = case.get("lr_scale", 1.0)  # train_steps sets every step's lr (build's is overwritten)
        res = {"param_type": type(next(model.parameters())).__name__}
        if "load" in case:
            extra = load_dcp(case["load"], model, opt)
            res["extra"] = extra
            res.update(train_steps(model, opt, range(extra["step"], case["steps"]), rank, world, lr_scale))
        else:
            res.update(train_steps(model, opt, range(case["steps"]), rank, world, lr_scale))
            if "save" in case:
                save_dcp(case["save"], model, opt, extra={"step": case["steps"], "sampler": {"pos": 8 * case["steps"]}})
        results[case["name"]] = res
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()
