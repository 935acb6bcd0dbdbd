"""train.py's throughput against a bare PyTorch loop on the same model and batch.

    python -m tools.bench_train                       # LLaMA-20M, 8 x 256 tokens, fp32, AdamW, CPU
    python -m tools.bench_train --model tiny --optim am_adamw --steps 20
    python -m tools.bench_train --switches             # + each switch on vs off: train.py against train.py
    python -m tools.bench_train --switches --switch train.compile=true,false

Both sides run in this process, interleaved (bare, train.py, bare, train.py) so machine noise hits
both alike; each side's figure is the median step time after warm-up steps. train.py's step time
comes from its own metrics.jsonl (`tokens_per_s` per step, log.every=1); evaluation and
checkpointing happen only at the end and are excluded. Prints the ratio (target >= 0.97).
With --switches, each switch (`key=on,off`; default: the chunked loss and full activation
checkpointing) is run on and off in the same interleaved rounds, and its tokens/s ratio on / off printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


from amllm.config import ModelConfig, OptimConfig
from amllm.metrics import read_metrics
from amllm.model import build_model, lm_loss, load_llama_config
from amllm.optim_factory import build_optimizer


def bare_loop(model_name: str, optim: str, vocab: int, batch: int, seq: int, steps: int) -> list[float]:
    """The minimum a training step needs: forward, loss, backward, clip, step, zero_grad."""
    cfg = load_llama_config(ModelConfig(name=model_name), vocab_size=vocab)
    model = build_model(cfg)
    opt = build_optimizer(OptimConfig(name=optim), model.parameters(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = lm_loss(model(input_ids=x[:, :-1]).logits, x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t)
    return times


def train_py(model_name: str, optim: str, batch: int, seq: int, steps: int, run_dir: Path,
             extra: tuple[str, ...] = ()) -> tuple[list[float], int]:
    """Per-step times of a real train.py run, and the vocabulary size it used."""
    import train

    train.main([f"run_dir={run_dir}", f"model.name={model_name}", f"optim.name={optim}",
                f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.micro_batch_size={batch}",
                f"data.seq_len={seq}", "eval.every=0", "eval.tokens=2048", "checkpoint.every=0",
                "checkpoint.resume=never", "log.every=1", "log.progress=false", *extra])
    tps = [r["tokens_per_s"] for r in read_metrics(run_dir, "train")]
    final = torch.load(run_dir / f"step-{steps}" / "model.pt", weights_only=True)
    vocab = final["model.embed_tokens.weight"].shape[0]
    return [batch * seq / t for t in tps], vocab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_20m")
    p.add_argument("--optim", default="adamw")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps dropped from each side's median")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--switches", action="store_true", help="also time each --switch on vs off")
    p.add_argument("--switch", action="append", default=None, metavar="KEY=ON,OFF",
                   help="a train.py setting to time on vs off (default: train.loss_chunk=1024,0 and "
                        "train.activation_checkpointing=full,none)")
    a = p.parse_args()
    switches = a.switch or ["train.loss_chunk=1024,0", "train.activation_checkpointing=full,none"]
    sides = {}  # (switch, value) -> step times
    bare, trained = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            run = Path(tmp) / f"run{r}"
            t_steps, vocab = train_py(a.model, a.optim, a.batch, a.seq, a.steps, run)
            trained += t_steps[a.warmup:]
            bare += bare_loop(a.model, a.optim, vocab, a.batch, a.seq, a.steps)[a.warmup:]
            for sw in switches if a.switches else ():
                key, values = sw.split("=", 1)
                for value in values.split(","):
                    times, _ = train_py(a.model, a.optim, a.batch, a.seq, a.steps, Path(tmp) / f"{key}-{value}-{r}",
                                        (f"{key}={value}",))
                    sides.setdefault((key, value), []).extend(times[a.warmup:])
    tok = a.batch * a.seq
    bare_tps = tok / statistics.median(bare)
    train_tps = tok / statistics.median(trained)
    print(f"model {a.model}, optim {a.optim}, batch {a.batch}x{a.seq}, {torch.get_num_threads()} threads, "
          f"{a.rounds} interleaved rounds x {a.steps - a.warmup} timed steps")
    print(f"bare PyTorch loop : {bare_tps:10,.0f} tokens/s")
    print(f"train.py          : {train_tps:10,.0f} tokens/s")
    print(f"ratio train.py / bare = {train_tps / bare_tps:.3f}   (target >= 0.97)")
    for sw in switches if a.switches else ():
        key, values = sw.split("=", 1)
        on, off = values.split(",")[:2]
        t_on, t_off = statistics.median(sides[(key, on)]), statistics.median(sides[(key, off)])
        print(f"{key}: {on} {tok / t_on:10,.0f} tokens/s, {off} {tok / t_off:10,.0f} tokens/s, "
              f"ratio {on} / {off} = {t_off / t_on:.3f}")


if __name__ == "__main__":
    main()
