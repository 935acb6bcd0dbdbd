#!/usr/bin/env python
"""Plot loss, momentum β and learning rate of training runs.

    python -m tools.plot runs/a runs/b ... --out figs [--smooth N]
    python -m tools.plot runs --out figs          # every run directory inside runs/

Writes loss.png (the paper's Fig. 5 layout: validation and smoothed training loss against
tokens), beta.png, beta_layers_<run>.png (per-layer runs: one heatmap per setting, its first
seed), beta_spikes.png (AM runs: β's dips marked against the training loss' spikes, the first
seed of each setting) and lr.png; a figure without data is skipped with a note. Runs that differ
only in their seed are drawn as mean with a min-max band.
"""

from __future__ import annotations

import re
import sys
import warnings
from functools import reduce
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from tools.runs import Run, load_runs_or_report, runs_parser

matplotlib.use("Agg")  # files only; no figure exists yet, so switching after the import is fine

SEED_STYLES = ("-", "--", ":", "-.")


def finite(y: np.ndarray) -> np.ndarray:
    """NaN for every non-finite value: matplotlib leaves a gap there, ±inf would wreck the axes."""
    return np.where(np.isfinite(y), y, np.nan)


def smooth(y: np.ndarray, n: int) -> np.ndarray:
    """Trailing mean over the last n logged points that skips non-finite values, so one NaN
    does not blank a whole window; points that are themselves non-finite stay a gap."""
    ok = np.isfinite(y)
    if n <= 1 or not len(y):
        return finite(y)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    count = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(hi - n, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (csum[hi] - csum[lo]) / (count[hi] - count[lo])
    return np.where(ok, out, np.nan)


def group_by_setting(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        # Without a config nothing says two runs are seeds of one setting: keep them apart.
        key = run.group_label if run.method is not None else str(run.path)
        groups.setdefault(key, []).append(run)
    return groups


def colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def curves(runs: list[Run], table: str, key: str, xkey: str, transform=finite):
    """Yield (x, mean, min, max) over the runs at the steps all of them logged (seeds may differ
    in length); runs with no step in common are yielded one by one instead."""
    cols = [getattr(r, table) for r in runs if len(getattr(r, table).get("step", ()))]
    if not cols:
        return
    common = reduce(np.intersect1d, [c["step"] for c in cols])
    parts = [cols] if len(common) else [[c] for c in cols]
    for part in parts:
        steps = common if len(common) else part[0]["step"]
        ys = np.stack([transform(c[key])[np.searchsorted(c["step"], steps)] for c in part])
        x = part[0][xkey][np.searchsorted(part[0]["step"], steps)]
        # Plain (not nan-) mean: a seed that diverged must show, not be averaged away.
        yield x, ys.mean(0), ys.min(0), ys.max(0)


def has(run: Run, table: str, key: str) -> bool:
    return bool(np.isfinite(getattr(run, table).get(key, np.array([]))).any())


def run_styles(runs: list[Run]) -> dict[int, dict]:
    """One colour per setting, one line style per seed within it; computed over all runs so a
    run has the same colour in every figure."""
    groups = group_by_setting(runs)
    styles = {}
    for colour, members in zip(colours(len(groups)), groups.values()):
        for i, run in enumerate(members):
            styles[id(run)] = {"color": colour, "ls": SEED_STYLES[i % len(SEED_STYLES)]}
    return styles


def draw_loss(ax, runs: list[Run], styles: dict, smoothing: int) -> tuple[str, str, str]:
    # Tokens is the paper's x axis; fall back to steps when some run did not log tokens.
    xkey = "tokens" if all(has(r, "train", "tokens") or has(r, "eval", "tokens") for r in runs) else "step"
    shown = []
    for members in group_by_setting(runs).values():
        n, colour = len(members), styles[id(members[0])]["color"]
        label = members[0].label if n == 1 else f"{members[0].group_label} (mean of {n} seeds, min-max band)"
        for x, y, lo, hi in curves(members, "train", "loss", xkey, lambda y: smooth(y, smoothing)):
            ax.plot(x, y, color=colour, alpha=0.35, lw=1)
            shown.append(y)
        for i, (x, y, lo, hi) in enumerate(curves(members, "eval", "val_loss", xkey)):
            ax.plot(x, y, color=colour, marker="o", ms=3.5, lw=1.6, label=None if i else label)
            if n > 1:
                ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
            shown.append(y)
    values = np.concatenate(shown)
    if np.isfinite(values).any():
        # Zoom past the initial drop from ~ln(vocab), as the paper does; differences live near the end.
        bottom, top = np.nanmin(values), np.nanpercentile(values, 95)
        pad = 0.05 * max(top - bottom, 1e-3)
        ax.set_ylim(bottom - pad, top + 2 * pad)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="k", marker="o", ms=3.5, lw=1.6), Line2D([], [], color="k", alpha=0.35)]
    labels += ["validation loss", f"training loss (smoothed over {smoothing} logs)"]
    ax.legend(handles, labels, fontsize=8)
    return "tokens" if xkey == "tokens" else "step", "loss", "Validation (markers) and training (faint) loss"


def beta_floor(run: Run) -> np.ndarray:
    """β per step, the smallest layer's for per-layer runs."""
    t = run.train
    if run.betas is not None and len(run.beta_steps) == len(t["step"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmin(finite(run.betas), 1)
    return finite(t["beta_min"]) if has(run, "train", "beta_min") else finite(t["beta"])


def draw_beta(ax, runs: list[Run], styles: dict) -> tuple[str, str, str]:
    groups = group_by_setting(runs)
    if any(len(members) > 1 for members in groups.values()):
        # Seeds of a setting: mean β over seeds, band from the lowest to the highest seed (per-layer
        # runs: their smallest layer's β), so a dip in any one seed shows as the band's lower edge.
        for members in groups.values():
            style, n = styles[id(members[0])], len(members)
            steps = reduce(np.intersect1d, [r.train["step"] for r in members])
            ys = np.stack([beta_floor(r)[np.searchsorted(r.train["step"], steps)] for r in members])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
            label = members[0].label if n == 1 else f"{members[0].group_label} (mean of {n} seeds, min-max band)"
            ax.plot(steps, mean, lw=1.3, color=style["color"], label=label)
            if n > 1:
                ax.fill_between(steps, lo, hi, color=style["color"], alpha=0.2, lw=0)
        return "step", "β (momentum; per-layer runs: smallest layer)", "Adaptive momentum β over seeds"
    for run in runs:
        style = styles[id(run)]
        if run.betas is not None:
            b = finite(run.betas)
            with warnings.catch_warnings():  # a step whose β are all NaN is a gap, not a warning
                warnings.simplefilter("ignore", RuntimeWarning)
                x, y, lo, hi = run.beta_steps, np.nanmean(b, 1), np.nanmin(b, 1), np.nanmax(b, 1)
            label = f"{run.label} (layer mean, min-max band)"
        else:
            t = run.train
            x, y, lo, hi = t["step"], finite(t["beta"]), finite(t["beta_min"]), finite(t["beta_max"])
            label = run.label
            if not run.cfg("optim.per_layer"):
                lo = hi = None  # one global β: there is no spread over layers to show
        ax.plot(x, y, lw=1.3, label=label, **style)
        if lo is not None and np.isfinite(lo).any() and np.isfinite(hi).any():
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.2, lw=0)
    return "step", "β (momentum)", "Adaptive momentum β"


def draw_lr(ax, runs: list[Run], styles: dict) -> tuple[str, str, str]:
    for run in runs:
        ax.plot(run.train["step"], finite(run.train["lr"]), lw=1.3, label=run.label, **styles[id(run)])
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return "step", "learning rate", "Learning-rate schedule"


def plot_beta_layers(run: Run, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps = run.beta_steps
    # imshow assumes evenly spaced columns, which the trainer's fixed logging interval gives.
    image = ax.imshow(
        finite(run.betas).T,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        extent=(steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, -0.5, run.betas.shape[1] - 0.5),
        cmap="viridis",
    )
    fig.colorbar(image, ax=ax, label="β")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="step", ylabel="layer (parameter group index)", title=f"Per-layer β: {run.label}")
    return save(fig, path)


def spikes_and_dips(run: Run, dip: float = 0.02, spike: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Steps where β < β_max - dip, and steps where the training loss rose by more than `spike`
    over the previous step (tools/summarize.py counts the same)."""
    t = run.train
    beta_max = float(run.cfg("optim.beta1", 0.9))
    b = beta_floor(run)
    rise = np.concatenate([[False], np.diff(t["loss"]) > spike])
    return t["step"][np.nan_to_num(b, nan=beta_max) < beta_max - dip], t["step"][rise]


def plot_beta_spikes(runs: list[Run], path: Path) -> Path:
    """One panel per AM setting (its first seed): training loss with its spikes, β with its dips."""
    firsts = [members[0] for members in group_by_setting(runs).values()]
    fig, axes = plt.subplots(len(firsts), 1, figsize=(9, 2.6 * len(firsts) + 0.6), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], firsts):
        t = run.train
        dips, spikes = spikes_and_dips(run)
        ax.plot(t["step"], finite(t["loss"]), color="tab:gray", lw=1.2, label="training loss")
        ax.plot(spikes, finite(t["loss"])[np.searchsorted(t["step"], spikes)], "x", color="tab:red", ms=7,
                mew=2, label=f"loss spike (> +{0.1:g} nats over the previous step)")
        lo, hi = np.nanpercentile(finite(t["loss"]), [0, 97])
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))
        ax.set_ylabel("training loss")
        ax2 = ax.twinx()
        b = beta_floor(run)
        label = "β" + (" (smallest layer)" if run.betas is not None else "")
        ax2.plot(t["step"], b, color="tab:blue", lw=1.3, label=label)
        ax2.plot(dips, b[np.searchsorted(t["step"], dips)], "v", color="tab:blue", ms=6,
                 label="β dip (< β_max - 0.02)")
        for s in dips:
            ax.axvline(s, color="tab:blue", alpha=0.15, lw=3)
        ax2.set_ylabel("β")
        ax2.set_ylim(min(0.6, float(np.nanmin(b)) - 0.02), 0.95)
        ax.set_title(f"{run.label}: {len(dips)} β dips, {len(spikes)} loss spikes", fontsize=9)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return save(fig, path, dpi=90)


def save(fig, path: Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def plot_all(runs: list[Run], out: Path, smoothing: int = 20) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    styles = run_styles(runs)
    figures = (  # file, which runs have data for it, how to draw them, what is missing otherwise
        ("loss.png", lambda r: has(r, "eval", "val_loss") or has(r, "train", "loss"),
         lambda ax, rs, st: draw_loss(ax, rs, st, smoothing), "no loss logged in any run"),
        ("beta.png", lambda r: r.betas is not None or has(r, "train", "beta"), draw_beta,
         "no β logged (plain AdamW/SGD runs only)"),
        ("lr.png", lambda r: has(r, "train", "lr"), draw_lr, "no learning rate logged"),
    )
    written = []
    for name, wanted, draw, missing in figures:
        chosen = [r for r in runs if wanted(r)]
        if not chosen:
            print(f"note: {missing}; skipping {name}")
            continue
        fig, ax = plt.subplots(figsize=(9, 5.5))
        xlabel, ylabel, title = draw(ax, chosen, styles)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend() is None:
            ax.legend(fontsize=8)
        written.append(save(fig, out / name))
    am_runs = [r for r in runs if has(r, "train", "beta") and has(r, "train", "loss")]
    if am_runs:
        written.append(plot_beta_spikes(am_runs, out / "beta_spikes.png"))
    used: set[str] = set()
    for members in group_by_setting(runs).values():
        run = members[0]  # one heatmap per setting: its first seed
        if run.betas is None:
            continue
        stem = re.sub(r"[^\w.-]+", "_", run.name)
        while stem in used:  # same directory name under different parents
            stem += "_"
        used.add(stem)
        written.append(plot_beta_layers(run, out / f"beta_layers_{stem}.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = runs_parser(__doc__)
    parser.add_argument("--out", required=True, type=Path, help="directory for the PNG figures")
    parser.add_argument("--smooth", type=int, default=20, metavar="N",
                        help="trailing mean over N logged training losses (1: none; default 20)")
    args = parser.parse_args(argv)
    runs = load_runs_or_report(args.runs)
    if runs is None:
        return 2
    plot_all(runs, args.out, args.smooth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
