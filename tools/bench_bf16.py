"""Does bf16_pure learn what fp32 learns? The default job (tiny LLaMA, embedded corpus), trained to the end
with each precision and optimizer setting, final validation losses side by side.

    python -m tools.bench_bf16                        # the cases below, ~1-2 min each on a CPU
    python -m tools.bench_bf16 --quick                # AM-AdamW only: fp32, bf16_pure, paper harness
    python -m tools.bench_bf16 --only "adamw fp32" "adamw bf16_pure"   # named cases only
    python -m tools.bench_bf16 --device cuda --steps 200

Cases (every other setting is the default job's):

| case                | train.precision | optimizer | optimizer state | parameter write-back   |
|---------------------|-----------------|-----------|-----------------|------------------------|
| am_adamw fp32       | fp32            | AM-AdamW  | fp32            | exact (fp32)           |
| am_adamw bf16_pure  | bf16_pure       | AM-AdamW  | fp32 (default)  | stochastic rounding    |
| am_adamw paper      | bf16_pure       | AM-AdamW  | bf16            | round to nearest       |
| adamw fp32          | fp32            | torch     | fp32            | exact (fp32)           |
| adamw bf16_pure     | bf16_pure       | torch     | bf16            | round to nearest       |

"paper" is the paper's harness: bf16 weights and bf16 moments, round to nearest
(optim.state_dtype=param optim.stochastic_rounding=false). Prints each case's final val loss and its
ratio to the fp32 run of the same optimizer (bf16_pure's acceptance: within 1%, tools/gpu_check.sh).
The runs go to --out (default runs/bench_bf16/; each case's directory is replaced).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from amllm.metrics import read_metrics

CASES = {
    "am_adamw fp32": ["optim.name=am_adamw", "train.precision=fp32"],
    "am_adamw bf16_pure": ["optim.name=am_adamw", "train.precision=bf16_pure"],
    "am_adamw paper": ["optim.name=am_adamw", "train.precision=bf16_pure", "optim.state_dtype=param",
                       "optim.stochastic_rounding=false"],
    "adamw fp32": ["optim.name=adamw", "train.precision=fp32"],
    "adamw bf16_pure": ["optim.name=adamw", "train.precision=bf16_pure"],
}
QUICK = ("am_adamw fp32", "am_adamw bf16_pure", "am_adamw paper")


def final_val_loss(run: Path) -> float:
    evals = [r for r in read_metrics(run, "eval") if "val_loss" in r]
    if not evals:
        raise SystemExit(f"error: {run} has no evaluation record (eval.every=0?)")
    return float(evals[-1]["val_loss"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the default job's)")
    p.add_argument("--quick", action="store_true", help="AM-AdamW only: fp32, bf16_pure, paper harness")
    p.add_argument("--only", nargs="+", default=None, metavar="CASE", help="these cases, e.g. --only 'adamw fp32'")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every case")
    args = p.parse_args(argv)

    import train  # the trainer itself, in this process (train.py at the repository root)

    names = args.only or (QUICK if args.quick else tuple(CASES))
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; choose from {', '.join(map(repr, CASES))}")
    out = Path(args.out)
    for name in names:  # only the cases this run makes (an --only run keeps the others' results)
        shutil.rmtree(out / name.replace(" ", "_"), ignore_errors=True)
    common = [f"train.device={args.device}", "log.progress=false", *args.set]
    if args.steps is not None:
        common.append(f"train.max_steps={args.steps}")
    losses, secs = {}, {}
    for name in names:
        run = out / name.replace(" ", "_")
        start = time.perf_counter()
        rc = train.main([*common, *CASES[name], f"run_dir={run}"])
        if rc != 0:
            raise SystemExit(f"error: case {name!r} exited with {rc} (log: {run})")
        secs[name], losses[name] = time.perf_counter() - start, final_val_loss(run)
        print(f"[bench_bf16] {name}: final val loss {losses[name]:.4f} ({secs[name]:.0f} s)", flush=True)
    print(f"\n{'case':<20} {'final val loss':>14} {'vs fp32':>9} {'time':>7}")
    for name, loss in losses.items():
        ref = losses.get(name.split()[0] + " fp32")
        ratio = f"{(loss / ref - 1) * 100:+.2f}%" if ref else "-"
        print(f"{name:<20} {loss:>14.4f} {ratio:>9} {secs[name]:>6.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
