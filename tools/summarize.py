#!/usr/bin/env python
"""Markdown tables of validation results of training runs.

    python -m tools.summarize runs/* [--out results.md] [--paper]
    python -m tools.summarize runs/study_beta --study [--pair TREAT:BASE ...] --out docs/study/results.md
    python -m tools.summarize runs/study_beta --export docs/study/runs   # compact copies of the runs
    python -m tools.summarize runs/study_warmup --bundle docs/study/warmup.jsonl   # the same, one file
    python -m tools.summarize docs/study/warmup.jsonl --study       # a bundle reads like run directories
    python -m tools.summarize runs/more_seeds --bundle docs/study/warmup.jsonl --add   # grow it

Table 1: final and best validation loss / perplexity per run. Table 2, the paper's layout:
rows model x schedule, columns AdamW | AM-AdamW | Clip | Restart, cells the mean final
validation loss over seeds. --paper appends the paper's reference numbers.

--study adds, for runs named `<arm>-s<seed>` (tools/sweep.py's arms), the arms' β statistics and
the paired comparisons: for each pair TREAT:BASE of arms, over the seeds both ran (same init and
data order), the mean difference of final validation loss (TREAT - BASE; negative: TREAT better),
its 95% paired-t interval and two-sided p, the win count (TREAT lower), and the convergence
speedup: the steps TREAT needs to reach BASE's final validation loss, interpolated linearly
between TREAT's evaluations, and BASE's steps divided by that. Default pairs: DEFAULT_PAIRS.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from tools.runs import (
    PAPER_METHODS, PAPER_VAL_LOSS, Run, RunError, format_lr, load_runs_or_report, natural_key, runs_parser,
    write_bundle)

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
            # Runs of one cell are seeds only if they share lr and batch size; otherwise a sweep.
            key = (run.lr, run.cfg("train.batch_size"))
            cells.setdefault((run.model, run.schedule, run.method), {}).setdefault(key, []).append(run)
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
            if len({k[0] for k in by_lr}) > 1 and lr[0] is not None:
                text += f", lr {format_lr(lr[0])}"
            if len({k[1] for k in by_lr}) > 1 and lr[1] is not None:
                text += f", batch {lr[1]}"
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
        table += (" Where a cell holds several learning rates or batch sizes, the setting with the best mean "
                  "is shown.")
    if starred:
        table += "\n\n\\* includes a run without a DONE marker (still running or stopped early)."
    return table, notes


def seed_stats(runs: list[Run]) -> tuple[float, float, int]:
    losses = np.array([r.final_eval()[0] for r in runs])
    std = float(losses.std(ddof=1)) if len(losses) > 1 else math.nan
    return float(losses.mean()), std, len(losses)


# ---- paired statistics over seeds ------------------------------------------------------------------
# (treatment, baseline) arm names; a pair is shown when both arms have runs.
DEFAULT_PAIRS = (
    ("am_adamw-warmup", "adamw-warmup"),
    ("am_adamw-nowarmup", "adamw-nowarmup"),
    ("am_adamw-nowarmup", "adamw-warmup"),        # the paper's claim: AM without warmup vs AdamW with it
    ("adamw-nowarmup", "adamw-warmup"),           # the premise: does AdamW need warmup here?
    ("am_adamw-nowarmup", "am_adamw-warmup"),
    ("am_adamw-clip-nowarmup", "adamw-nowarmup"),
    ("am_adamw-restart-nowarmup", "adamw-nowarmup"),
    ("am_adamw-perlayer-nowarmup", "adamw-nowarmup"),
    ("am_adamw-clip-nowarmup", "am_adamw-nowarmup"),
    ("am_adamw-restart-nowarmup", "am_adamw-nowarmup"),
    ("am_adamw-perlayer-nowarmup", "am_adamw-nowarmup"),
    ("am_adamw-perlayer-nowarmup", "adamw-beta1_0.84-nowarmup"),  # per-layer vs less momentum
    ("adamw-beta1_0.84-nowarmup", "adamw-nowarmup"),
)
BETA_TOL = 1e-3   # β counts as below β_max when β < β_max - BETA_TOL (float32 β_max is 0.89999998)
DIP = 0.02        # a β "dip": β < β_max - DIP
SPIKE = 0.1       # a loss "spike": training loss above the previous step's by more than this (nats)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function (no scipy in the project's dependencies)."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of t_cdf by bisection (p in (0, 1))."""
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def binom_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how often dips placed at random would land near a spike k times."""
    return float(sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def detectable(sd: float, n: int, power: float = 0.8) -> float:
    """The paired difference n seeds detect with this power (two-sided 5%): (t_.975 + t_power) sd / sqrt(n)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_quantile(0.975, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def paired_stats(base: dict, treat: dict) -> dict | None:
    """TREAT - BASE over the seeds both have (finite values only). Keys: seeds, n, diffs, mean, sd,
    lo, hi (95% paired-t interval), p (two-sided), wins (TREAT lower), excluded (non-finite seeds)."""
    seeds = sorted(set(base) & set(treat), key=lambda s: natural_key(str(s)))
    ok = [s for s in seeds if math.isfinite(base[s]) and math.isfinite(treat[s])]
    if not ok:
        return None
    d = np.array([treat[s] - base[s] for s in ok], dtype=np.float64)
    n, mean = len(d), float(d.mean())
    out = {"seeds": ok, "n": n, "diffs": d, "mean": mean, "wins": int((d < 0).sum()),
           "excluded": [s for s in seeds if s not in ok], "sd": math.nan, "lo": math.nan, "hi": math.nan,
           "p": math.nan}
    if n > 1:
        sd = float(d.std(ddof=1))
        se = sd / math.sqrt(n)
        half = t_quantile(0.975, n - 1) * se
        out.update(sd=sd, lo=mean - half, hi=mean + half,
                   p=(2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1)) if se > 0 else (0.0 if mean else 1.0)))
    return out


def steps_to_reach(steps, losses, target: float) -> float | None:
    """First step at which the eval curve reaches `target`, linear between evaluations; None if it
    never does. Reached at the first evaluation: that evaluation's step (no point before it)."""
    prev = None
    for s, loss in zip(steps, losses):
        if math.isfinite(loss) and loss <= target:
            if prev is None or not math.isfinite(prev[1]) or prev[1] == loss:
                return float(s)
            s0, l0 = prev
            return float(s0 + (l0 - target) / (l0 - loss) * (s - s0))
        prev = (s, loss)
    return None


def speedup(base_runs: dict, treat_runs: dict) -> dict | None:
    """Per seed: steps TREAT needs to reach BASE's final validation loss, and BASE's final step / that."""
    per_seed = {}
    for seed in sorted(set(base_runs) & set(treat_runs), key=lambda s: natural_key(str(s))):
        b, t = base_runs[seed], treat_runs[seed]
        if not len(b.eval.get("step", ())) or not len(t.eval.get("step", ())):
            continue
        target = float(b.eval["val_loss"][-1])
        if not math.isfinite(target):
            continue
        reach = steps_to_reach(t.eval["step"], t.eval["val_loss"], target)
        per_seed[seed] = (reach, float(b.eval["step"][-1]) / reach if reach else None)
    if not per_seed:
        return None
    reached = [v for v in per_seed.values() if v[0] is not None]
    return {"per_seed": per_seed, "n": len(per_seed), "reached": len(reached),
            "steps": float(np.mean([r for r, _ in reached])) if reached else None,
            "ratio": float(np.mean([x for _, x in reached])) if reached else None}


def mean_curve_speedup(base_runs: dict, treat_runs: dict) -> tuple[float | None, float | None]:
    """The same on the seed-mean curves (seeds both arms ran; evaluation steps all of them share):
    steps for TREAT's mean curve to reach BASE's mean final loss, and BASE's final step / that.
    Free of the selection in speedup()'s mean over the seeds that reach the target."""
    seeds = [s for s in set(base_runs) & set(treat_runs)
             if len(base_runs[s].eval.get("step", ())) and len(treat_runs[s].eval.get("step", ()))]
    if not seeds:
        return None, None
    target = float(np.mean([base_runs[s].eval["val_loss"][-1] for s in seeds]))
    common = sorted(set.intersection(*(set(treat_runs[s].eval["step"].tolist()) for s in seeds)))
    if not math.isfinite(target) or not common:
        return None, None
    curve = [float(np.mean([treat_runs[s].eval["val_loss"][list(treat_runs[s].eval["step"]).index(c)]
                            for s in seeds])) for c in common]
    reach = steps_to_reach(common, curve, target)
    base_steps = float(np.mean([base_runs[s].eval["step"][-1] for s in seeds]))
    return reach, (base_steps / reach if reach else None)


def arm_of(run: Run) -> str:
    """`am_adamw-nowarmup-s3` -> `am_adamw-nowarmup` (tools/sweep.py's arms name runs <arm>-s<seed>)."""
    return re.sub(r"-s\d+$", "", run.name)


def arms_of(runs: list[Run]) -> dict[str, dict]:
    """arm -> {seed: run}; a run without a seed in its config is keyed by its name."""
    arms: dict[str, dict] = {}
    for run in runs:
        arms.setdefault(arm_of(run), {})[run.seed if run.seed is not None else run.name] = run
    return arms


def final_loss(run: Run) -> float:
    final = run.final_eval()
    return final[0] if final else math.nan


def beta_stats(run: Run) -> dict | None:
    """min β (over layers, for per-layer runs), steps below β_max, dips, and how many dips follow a loss spike."""
    t = run.train
    if not len(t.get("step", ())) or not np.isfinite(t.get("beta_min", np.array([]))).any():
        return None
    beta_max = float(run.cfg("optim.beta1", 0.9))
    b = np.where(np.isfinite(t["beta_min"]), t["beta_min"], beta_max)
    loss = t["loss"]
    rise = np.concatenate([[False], np.diff(loss) > SPIKE])  # spike at step i: loss[i] - loss[i-1] > SPIKE
    near = rise | np.concatenate([[False], rise[:-1]]) | np.concatenate([[False, False], rise[:-2]])
    dips = b < beta_max - DIP
    return {"min": float(b.min()), "mean": float(np.mean(np.where(np.isfinite(t["beta"]), t["beta"], beta_max))),
            "below": int((b < beta_max - BETA_TOL).sum()), "steps": len(b), "dips": int(dips.sum()),
            "dips_after_spike": int((dips & near).sum()),
            "near_rate": float(near[1:].mean()) if len(b) > 1 else math.nan,
            "spikes": int(rise.sum())}


DIP_RULE = 1 / 9  # β < β_max = 0.9 ⇔ a² − 2ac > 1/9 when ℓ = 0 (docs/study.md)


def _term_rows(run: Run):
    """(β, a, c, ℓ) for every step (global β) or every step and layer (per-layer), steps >= 2 (d = 0
    before), where the run logged the terms."""
    if run.layer_terms is not None and np.isfinite(run.layer_terms).any():
        keep = run.beta_steps >= 2
        b, t = run.betas[keep], run.layer_terms[keep]
        return np.stack([b.ravel(), t[:, 0].ravel(), t[:, 1].ravel(), t[:, 2].ravel()], 1)
    tr = run.train
    if "beta_dg" not in tr or not np.isfinite(tr["beta_dg"]).any():
        return None
    keep = tr["step"] >= 2
    return np.stack([tr["beta"][keep], tr["beta_dg"][keep], tr["beta_cos"][keep], tr["beta_lam"][keep]], 1)


def beta_terms_table(arms: dict) -> str:
    """Why β dips, from the logged terms (optim.beta_terms): β = (1 + ℓ)/(1 + a² − 2ac) clipped."""
    rows = []
    for arm, by_seed in sorted(arms.items()):
        parts = [x for x in (_term_rows(r) for r in by_seed.values()) if x is not None]
        if not parts:
            continue
        x = np.concatenate(parts)
        x = x[np.isfinite(x).all(1)]
        beta, a, c, ell = x.T
        beta_max = float(next(iter(by_seed.values())).cfg("optim.beta1", 0.9))
        closed = np.clip((1 + ell) / (1 + a * a - 2 * a * c), 0, beta_max)
        dip = beta < beta_max - DIP
        rule = a * a - 2 * a * c > DIP_RULE
        cell = (lambda v: f"{np.median(v):.3f}" if len(v) else MISSING)
        rows.append([f"`{arm}`", str(len(parts)), str(len(x)), f"{np.abs(closed - beta).max():.1e}",
                     str(int(dip.sum())), cell(a[dip]), cell(c[dip]), cell(ell[dip]),
                     f"{int((c[dip] < 0).sum())}/{int(dip.sum())}",
                     f"{int((rule & dip).sum())}/{int(dip.sum())}", f"{int((rule & ~dip).sum())}/{int((~dip).sum())}",
                     cell(a[~dip]), cell(c[~dip])])
    if not rows:
        return ""
    return "\n".join(["## Why β dips (optim.beta_terms)", "", markdown(
        ["arm", "seeds", "β's (steps × layers, step ≥ 2)", "max abs(closed form − logged β)", "dips",
         "median ‖d‖/‖g‖ at dips", "median cos(d, g) at dips", "median ℓ at dips", "dips with cos < 0",
         "dips with a² − 2ac > 1/9", "non-dips with a² − 2ac > 1/9", "median ‖d‖/‖g‖ elsewhere",
         "median cos elsewhere"], rows), "",
        "a = ‖d‖/‖g‖, c = cos(d, g) in the w-weighted inner product, ℓ the rest of the numerator (λ, lr ratio, "
        "weight decay); β = clip((1 + ℓ)/(1 + a² − 2ac), 0, β_max), so with ℓ ≈ 0 β < 0.9 exactly when "
        f"a² − 2ac > 1/9. A dip: β < β_max − {DIP:g} (so a few steps with β just under 0.9 satisfy the rule "
        "without being dips).", ""])


def _ci(stats: dict, digits: int = 4) -> str:
    if stats["n"] < 2:
        return MISSING
    return f"[{stats['lo']:+.{digits}f}, {stats['hi']:+.{digits}f}]"


def study_tables(runs: list[Run], pairs=DEFAULT_PAIRS) -> str:
    done = [r for r in runs if r.done]
    arms = arms_of(done)
    parts = ["## Arms", ""]
    if len(done) < len(runs):
        parts += [f"**Partial:** {len(runs) - len(done)} run(s) without a DONE marker (still running or "
                  f"stopped) are left out of these tables: "
                  + ", ".join(f"`{r.name}`" for r in runs if not r.done) + ".", ""]
    rows = []
    for arm, by_seed in sorted(arms.items()):
        losses = np.array([final_loss(r) for r in by_seed.values()], dtype=np.float64)
        finite_l = losses[np.isfinite(losses)]
        sd = float(finite_l.std(ddof=1)) if len(finite_l) > 1 else math.nan
        bs = [s for s in (beta_stats(r) for r in by_seed.values()) if s]
        if bs:
            mins = np.array([s["min"] for s in bs])
            below = np.array([s["below"] / s["steps"] for s in bs])
            dips, after = sum(s["dips"] for s in bs), sum(s["dips_after_spike"] for s in bs)
            near = float(np.mean([s["near_rate"] for s in bs]))
            p_near = binom_tail(after, dips, near) if dips else math.nan
            beta_cells = [f"{mins.min():.3f} / {np.median(mins):.3f} / {mins.max():.3f}",
                          f"{100 * below.mean():.1f}%", f"{dips}", f"{after}/{dips} (base rate {100 * near:.0f}%, p {num(p_near, 2)})",
                          f"{np.mean([s['mean'] for s in bs]):.3f}"]
        else:
            beta_cells = [MISSING] * 5
        rows.append([f"`{arm}`", str(len(by_seed)), f"{num(float(finite_l.mean()) if len(finite_l) else None, 4)}"
                     f" ± {num(sd, 4)}", *beta_cells])
    parts.append(markdown(["arm", "seeds", "final val loss (mean ± sd)", "min β over the run: lowest / median / "
                           "highest seed", "steps with β < β_max", "β dips (all seeds)",
                           "dips within 2 steps after a loss spike", "mean β"], rows))
    parts += ["", f"β is the global β, or the smallest layer's β for per-layer runs; β < β_max means below "
              f"β_max - {BETA_TOL:g}; a dip is β < β_max - {DIP:g}; a loss spike is a training loss above the "
              f"previous step's by more than {SPIKE:g} nats. Base rate: the share of steps that lie within 2 "
              "steps after a spike, i.e. what a dip placed at random would score; p: the chance of at least that many "
              "dips near a spike if dips fell at random (binomial at the base rate). Mean β: over steps and "
              "seeds (per-layer runs: of the layers' mean).", ""]
    parts += ["## Paired comparisons", ""]
    rows = []
    for treat, base in pairs:
        if treat not in arms or base not in arms:
            continue
        st = paired_stats({s: final_loss(r) for s, r in arms[base].items()},
                          {s: final_loss(r) for s, r in arms[treat].items()})
        if st is None:
            continue
        sp = speedup(arms[base], arms[treat])
        if sp is None or not sp["reached"]:
            reach = f"not reached (0/{sp['n'] if sp else 0})"
            ratio = MISSING
        else:
            reach = f"{sp['steps']:.1f} ({sp['reached']}/{sp['n']} seeds)"
            ratio = f"{sp['ratio']:.3f}×"
        note = f" ({len(st['excluded'])} non-finite excluded)" if st["excluded"] else ""
        m_reach, m_ratio = mean_curve_speedup(arms[base], arms[treat])
        mean_cell = f"{m_reach:.1f} ({m_ratio:.3f}×)" if m_reach else "not reached"
        rows.append([f"`{treat}` − `{base}`", f"{st['n']}{note}", f"{st['mean']:+.4f}", _ci(st),
                     "<0.001" if st["p"] < 1e-3 else num(st["p"], 3), f"{st['wins']}/{st['n']}",
                     num(st["sd"], 4), num(detectable(st["sd"], st["n"]), 4), reach, ratio, mean_cell])
    if rows:
        parts.append(markdown(["TREAT − BASE", "seeds", "mean Δ final val loss", "95% CI (paired t)",
                               "p", "TREAT wins", "paired sd", "detectable at 80% power",
                               "steps for TREAT to reach BASE's final loss",
                               "speedup (BASE steps / that)", "same on the seed-mean curves"], rows))
        parts += ["", "Δ < 0: TREAT ends lower. Pairs share the seed (model init and data order). Steps to "
                  "reach: linear interpolation between TREAT's evaluations, mean over the seeds that reach "
                  "BASE's final loss; speedup: BASE's final step divided by it, mean over those seeds (so it "
                  "leaves out "
                  "the seeds that never get there). Seed-mean curves: TREAT's validation curve averaged over the "
                  "seeds, against BASE's mean final loss; steps (speedup). Detectable: the |Δ| these seeds find "
                  "with 80% power at this paired sd, (t_0.975 + t_0.8) sd / sqrt(n).", ""]
    else:
        parts += ["No pair of arms with common seeds.", ""]
    parts += [beta_terms_table(arms)]
    return "\n".join(parts)


def export_runs(runs: list[Run], out: Path) -> list[Path]:
    """Compact copies (config.yaml, DONE, metrics.jsonl with the fields the tools read) of the runs."""
    keep_train = ("step", "tokens", "loss", "lr", "grad_norm", "beta", "beta_min", "beta_max", "betas", "time")
    keep_eval = ("step", "tokens", "val_loss", "val_ppl", "time")
    written = []
    for run in runs:
        dest = out / run.name
        dest.mkdir(parents=True, exist_ok=True)
        if (run.path / "config.yaml").exists():
            shutil.copyfile(run.path / "config.yaml", dest / "config.yaml")
        if run.done:
            (dest / "DONE").touch()
        lines = []
        for line in (run.path / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            kind = rec.get("kind") or ("eval" if "val_loss" in rec else "train")
            if kind not in ("train", "eval"):
                continue
            small = {"kind": kind}
            for key in keep_train if kind == "train" else keep_eval:
                v = rec.get(key)
                if isinstance(v, float):
                    v = round(v, 2) if key == "time" else float(f"{v:.7g}")
                if v is not None:
                    small[key] = v
            lines.append(json.dumps(small, separators=(",", ":")))
        (dest / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        written.append(dest)
    return written


def paper_reference() -> str:
    rows = [[f"LLaMA {size}", *(f"{PAPER_VAL_LOSS[size][m]:.2f}" for m in PAPER_METHODS)] for size in PAPER_VAL_LOSS]
    return markdown(["model", *PAPER_METHODS], rows)


def summarize(runs: list[Run], paper: bool = False, study: bool = False, pairs=DEFAULT_PAIRS) -> str:
    parts = ["# Results", ""]
    if study:
        parts += [study_tables(runs, pairs), ""]
    parts += ["## Runs", "", runs_table(runs), ""]
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
    parser.add_argument("--study", action="store_true",
                        help="arms' β statistics and paired comparisons (runs named <arm>-s<seed>)")
    parser.add_argument("--pair", action="append", metavar="TREAT:BASE",
                        help="a pair of arms to compare (repeatable; default: DEFAULT_PAIRS)")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="write compact copies of the runs (config, DONE, metrics) into DIR and stop")
    parser.add_argument("--bundle", type=Path, metavar="FILE.jsonl",
                        help="write the runs into one compact file (one line per run) that the tools read back, "
                             "and stop")
    parser.add_argument("--add", action="store_true",
                        help="with --bundle: keep the bundle's other runs (same-named runs are replaced)")
    args = parser.parse_args(argv)
    runs = load_runs_or_report(args.runs)
    if runs is None:
        return 2
    if args.export:
        print(f"wrote {len(export_runs(runs, args.export))} runs into {args.export}")
        return 0
    if args.bundle:
        try:
            total = write_bundle(runs, args.bundle, add=args.add)
        except RunError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {len(runs)} runs into {args.bundle}" + (f" ({total} in all)" if args.add else ""))
        return 0
    pairs = DEFAULT_PAIRS
    if args.pair:
        pairs = []
        for item in args.pair:
            treat, sep, base = item.partition(":")
            if not sep or not treat or not base:
                print(f"error: --pair {item!r} must look like TREAT:BASE (arm names)", file=sys.stderr)
                return 2
            pairs.append((treat, base))
    text = summarize(runs, args.paper, args.study, pairs)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
