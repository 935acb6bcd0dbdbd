"""Entry point the launch test starts through the real `deepspeed` CLI (one process per rank).

    deepspeed --num_gpus 2 tests/ds_launch_entry.py --deepspeed_config configs/deepspeed/zero2_fp32.json --out r.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", "--local-rank", type=int, default=0)  # the launcher passes it
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist

    from tests import ds_worker

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from amllm.optim import AMAdamW
    from amllm.parallel.deepspeed_backend import build_engine

    model = ds_worker.tiny_llama()
    opt = AMAdamW(ds_worker.param_groups(model), lr=ds_worker.LRS[0], betas=(0.9, 0.99))
    engine = build_engine(model, opt, ds_worker.trainer_config(bf16=False), ds_config=a.deepspeed_config)
    out = ds_worker.train_steps(engine, range(a.steps), rank, world)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump({"world": world, "loss": out["loss"], "beta": [b.tolist() for b in out["beta"]],
                       "engine_optimizer": type(engine.optimizer).__name__}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
