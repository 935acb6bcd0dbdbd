"""Probe what DeepSpeed's ZeRO wrappers do to a client optimizer (see docs/deepspeed_notes.md).

    python -m tools.ds_probe --stage 2 [--bf16] [--groups 2] [--sub-group-size 200]

Spawns 2 (--world) CPU ranks (gloo) and trains a tiny LLaMA for 2 steps with a recording optimizer (plain
SGD) that prints, at every step() call, the param groups it is shown, their flat tensors, whether
they hold a .grad, the padding contents and the model's bit16 weights, so one sees when
DeepSpeed copies fp32 -> bit16 relative to the call.
"""
import argparse
import os

import torch
import torch.multiprocessing as mp


class Recorder(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr, weight_decay=0.0))
        self.calls = []
        self.grads = {}  # id(flat) -> last grad seen
        self.model = None

    @torch.no_grad()
    def step(self, closure=None):
        info = []
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                gr = p.grad
                info.append(dict(group=gi, numel=p.numel(), dtype=str(p.dtype), has_grad=gr is not None,
                                 grad_sq=None if gr is None else float(gr.double().pow(2).sum()),
                                 x_sq=float(p.double().pow(2).sum()), tail_x=p[-3:].tolist(),
                                 tail_g=None if gr is None else gr[-3:].tolist()))
                if gr is not None:
                    self.grads[id(p)] = gr.clone()
                    p.add_(gr, alpha=-g["lr"])
        w = next(self.model.parameters()) if self.model is not None else None
        self.calls.append(dict(n_groups=len(self.param_groups), params=info,
                               w0=None if w is None else float(w.float().sum())))


def worker(rank, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                         max_position_embeddings=64, tie_word_embeddings=False))
    params = list(model.parameters())
    if args.groups == 2:
        groups = [dict(params=[p for p in params if p.dim() >= 2]),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    else:
        groups = [dict(params=params)]
    opt = Recorder(groups)
    zero = {"stage": args.stage}
    if args.stage == 3 and args.sub_group_size:
        zero["sub_group_size"] = args.sub_group_size
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": zero, "zero_allow_untested_optimizer": True,
           "bf16": {"enabled": args.bf16}}
    if args.fp32_accum:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    opt.model = engine.module
    zo = engine.optimizer
    if rank == 0:
        print("engine.optimizer:", type(zo).__name__, "basic is client:", engine.basic_optimizer is opt)
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
            if hasattr(zo, name):
                print(name, [t.numel() for t in getattr(zo, name)])
        for n, p in list(engine.module.named_parameters())[:4]:
            hp = getattr(p, "_hp_mapping", None)
            print("param", n, tuple(p.shape), "ds_shape", getattr(p, "ds_shape", None), "_hp_mapping",
                  None if hp is None else (hp.param_group_index, hp.lp_fragment_address, hp.hp_fragment_address))
        if hasattr(zo, "fp16_partitioned_groups"):
            print("stage3 per-param partition numel (ds_tensor):",
                  [[t.ds_numel for t in sg] for sg in zo.fp16_partitioned_groups][:3])
            print("stage3 param partition_numel / ds_numel:",
                  [(p.partition_numel(), p.ds_numel) for p in zo.fp16_groups[0]][:4])
    g = torch.Generator().manual_seed(rank)
    for step in range(2):
        ids = torch.randint(0, 128, (2, 16), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        before = len(opt.calls)
        engine.step()
        if rank == 0 or args.all_ranks:
            w = float(next(engine.module.parameters()).float().sum())
            print(f"[rank{rank}] engine step {step}: {len(opt.calls) - before} optimizer.step() calls; w0 after engine.step = {w:.6f}")
            for c in opt.calls[before:]:
                print("   call: groups shown", c["n_groups"], "w0 during call", c["w0"])
                for pi in c["params"]:
                    print("     ", pi)
    if args.stage == 3 and rank == args.world - 1:
        # padding slots of the fp32 flat partitions
        for i, flat in enumerate(zo.fp32_partitioned_groups_flat):
            off = 0
            for p, part in zip(zo.fp16_groups[i], zo.fp16_partitioned_groups[i]):
                n_real = max(0, min(p.ds_numel - rank * p.partition_numel(), p.partition_numel()))
                pad = flat[off + n_real: off + part.ds_numel]
                pad_g = opt.grads[id(flat)][off + n_real: off + part.ds_numel]
                if pad.numel():
                    print(f"   pad g = {pad_g.tolist()}")
                    print(f"[rank{rank}] sub-group {i} param numel {p.ds_numel} partition {p.partition_numel()} "
                          f"real {n_real} pad x = {pad.tolist()}")
                off += part.ds_numel


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--fp32-accum", action="store_true")
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--sub-group-size", type=int, default=0)
    ap.add_argument("--all-ranks", action="store_true")
    ap.add_argument("--hidden", type=int, default=32, help="33 (with --heads 3) gives odd-sized parameters, hence padding")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--world", type=int, default=2, help="3 ranks give ZeRO-3 per-parameter padding")
    ap.add_argument("--port", type=int, default=29611)
    a = ap.parse_args()
    mp.spawn(worker, args=(a,), nprocs=a.world)
