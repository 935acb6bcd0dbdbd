#!/usr/bin/env python
"""Markdown tables of validation results of training runs.

    python tools/summarize.py runs/* [--out results.md] [--paper]

Table 1: final and best validation loss / perplexity per run. Table 2, the paper's layout:
rows model x schedule, columns AdamW | AM-AdamW | Clip | Restart, cells the mean final
validation loss over seeds. --paper appends the paper's reference numbers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout, uninstalled

import numpy as np  # noqa: E402

from amllm.runs import (  # noqa: E402
    PAPER_METHODS, PAPER_VAL_LOSS, Run, format_lr, load_runs_or_report, natural_key, runs_parser)

MISSING = "—"
SCHEDULES = ("warmup", "no warmup")


def num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return MISSING
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)  # "nan" / "inf": a diverged run


def human(n: float) -> str:
    if not math.isfinite(n):
        return MISSING
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def loss_order(loss: float | None) -> float:
    """Sort key: lower loss first, diverged (nan) and never-evaluated runs last."""
    return loss if loss is not None and not math.isnan(loss) else math.inf


def runs_table(runs: list[Run]) -> str:
    def final_loss(run):
        final = run.final_eval()
        return final and final[0]

    rows = []
    for run in sorted(runs, key=lambda r: (r.model is None, natural_key(r.model), loss_order(final_loss(r)), r.name)):
        final, best = run.final_eval(), run.best_eval()
        t = run.train if len(run.train["step"]) else run.eval
        rows.append([
            f"`{run.name}`",
            run.label,
            str(t["step"][-1]) if len(t["step"]) else MISSING,
            human(t["tokens"][-1]) if len(t["step"]) else MISSING,
            num(final and final[0]),
            num(final and final[1], 2),
            f"{num(best[0])} (step {best[2]})" if best else MISSING,
            num(best and best[1], 2),
            "done" if run.done else "unfinished",
        ])
    header = ["run", "setting", "steps", "tokens", "final val loss", "final val ppl",
              "best val loss", "best val ppl", "status"]
    return markdown(header, rows)


def paper_table(runs: list[Run]) -> tuple[str, list[str]]:
    """The paper's layout; returns the table and notes on runs it could not place."""
    # cell (model, schedule, method) -> lr -> runs (seeds)
    cells: dict[tuple[str, str, str], dict[float | None, list[Run]]] = {}
    notes = []
    for run in runs:
        if not run.config:
            notes.append(f"`{run.name}`: no config.yaml")
        elif None in (run.model, run.schedule, run.method):
            notes.append(f"`{run.name}`: config.yaml lacks model.name, schedule.warmup_steps or optim.name")
        elif run.final_eval() is None:
            notes.append(f"`{run.name}`: no evaluation logged yet")
        else:
            cells.setdefault((run.model, run.schedule, run.method), {}).setdefault(run.lr, []).append(run)
    extra = sorted({m for _, _, m in cells} - set(PAPER_METHODS))
    methods = list(PAPER_METHODS) + extra
    row_keys = sorted({(m, s) for m, s, _ in cells}, key=lambda k: (natural_key(k[0]), SCHEDULES.index(k[1])))
    rows, starred = [], False
    for model, schedule in row_keys:
        row = [model, schedule]
        for method in methods:
            by_lr = cells.get((model, schedule, method))
            if not by_lr:
                row.append(MISSING)
                continue
            # Several learning rates in one cell: a sweep; report its best, as the paper does.
            stats = {lr: seed_stats(rs) for lr, rs in by_lr.items()}
            lr = min(stats, key=lambda k: loss_order(stats[k][0]))
            mean, std, n = stats[lr]
            text = num(mean) if n == 1 else f"{num(mean)} ± {num(std)} (n={n})"
            if len(by_lr) > 1:
                text += f", lr {format_lr(lr)}" if lr is not None else ""
            if not all(r.done for r in by_lr[lr]):
                text += "*"
                starred = True
            row.append(text)
        rows.append(row)
    if not rows:
        return "", notes
    table = markdown(["model", "schedule", *methods], rows)
    table += "\n\nCells: mean final validation loss over seeds; ± is the sample std (ddof=1), n the number of seeds."
    if any(len(v) > 1 for v in cells.values()):
        table += " Where a cell holds several learning rates, the one with the best mean is shown."
    if starred:
        table += "\n\n\\* includes a run without a DONE marker (still running or stopped early)."
    return table, notes


def seed_stats(runs: list[Run]) -> tuple[float, float, int]:
    losses = np.array([r.final_eval()[0] for r in runs])
    std = float(losses.std(ddof=1)) if len(losses) > 1 else math.nan
    return float(losses.mean()), std, len(losses)


def paper_reference() -> str:
    rows = [[f"LLaMA {size}", *(f"{PAPER_VAL_LOSS[size][m]:.2f}" for m in PAPER_METHODS)] for size in PAPER_VAL_LOSS]
    return markdown(["model", *PAPER_METHODS], rows)


def summarize(runs: list[Run], paper: bool = False) -> str:
    parts = ["# Results", "", "## Runs", "", runs_table(runs), ""]
    table, notes = paper_table(runs)
    parts += ["## Final validation loss (paper layout)", "", table or "No run can be placed in this table.", ""]
    if notes:
        parts += ["Not in this table:", "", *(f"- {n}" for n in notes), ""]
    if paper:
        parts += ["## Paper reference: LLaMA validation loss on C4", "",
                  "Topollai & Choromanska, *Adaptive Memory Momentum via a Model-Based Framework for "
                  "Deep Learning Optimization*, arXiv:2510.04988.", "", paper_reference(), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = runs_parser(__doc__)
    parser.add_argument("--out", type=Path, help="write the Markdown here instead of to stdout")
    parser.add_argument("--paper", action="store_true", help="append the paper's reference numbers")
    args = parser.parse_args(argv)
    runs = load_runs_or_report(args.runs)
    if runs is None:
        return 2
    text = summarize(runs, args.paper)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
