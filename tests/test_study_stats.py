"""tools/summarize.py's paired statistics and convergence speedup against hand computations.

Every expected number is written out (t-table quantiles, the closed-form Student-t distribution
function for 4 degrees of freedom, the interpolation done by hand), never taken from summarize."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.runs import load_run, load_runs
from tools import summarize

ROOT = Path(__file__).resolve().parents[1]

# A fixed table: final validation loss of BASE and TREAT on seeds 0..4 (TREAT - BASE = DIFFS).
BASE = [4.00, 4.10, 3.95, 4.05, 4.20]
DIFFS = [-0.10, -0.05, 0.02, -0.08, -0.04]


def t4_cdf(t: float) -> float:
    """Student's t distribution function with 4 degrees of freedom, closed form."""
    x = t / math.sqrt(1 + t * t / 4)
    return 0.5 + 3 / 8 * x * (1 - t * t / (12 * (1 + t * t / 4)))


def test_t_quantiles_match_the_table():
    # two-sided 95% critical values of Student's t, from a printed table
    for df, value in ((1, 12.7062), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert summarize.t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert summarize.t_quantile(0.025, 9) == pytest.approx(-2.2622, abs=1e-4)
    assert summarize.t_cdf(0.0, 7) == pytest.approx(0.5)
    assert summarize.t_cdf(1.5, 4) == pytest.approx(t4_cdf(1.5), abs=1e-12)


def test_binomial_tail_and_detectable_effect_by_hand():
    # P(X >= 2), X ~ Bin(3, 1/2) = (3 + 1)/8; P(X >= 0) = 1; P(X >= 1), Bin(2, 0.3) = 1 - 0.49
    assert summarize.binom_tail(2, 3, 0.5) == pytest.approx(0.5)
    assert summarize.binom_tail(0, 4, 0.2) == pytest.approx(1.0)
    assert summarize.binom_tail(1, 2, 0.3) == pytest.approx(0.51)
    # 10 seeds, sd 0.031: (t_.975,9 = 2.2622 + t_.80,9 = 0.8834) * 0.031 / sqrt(10) from printed tables
    assert summarize.detectable(0.031, 10) == pytest.approx((2.2622 + 0.8834) * 0.031 / math.sqrt(10), abs=2e-5)
    assert math.isnan(summarize.detectable(0.031, 1))


def test_paired_stats_by_hand():
    base = {s: b for s, b in enumerate(BASE)}
    treat = {s: b + d for s, (b, d) in enumerate(zip(BASE, DIFFS))}
    treat[7] = 3.0  # a seed BASE did not run: not paired
    st = summarize.paired_stats(base, treat)
    # by hand: mean -0.25/5; squared deviations .0025 + 0 + .0049 + .0009 + .0001 = .0084; var .0084/4
    mean, sd = -0.05, math.sqrt(0.0084 / 4)
    se = sd / math.sqrt(5)
    assert st["n"] == 5 and st["seeds"] == [0, 1, 2, 3, 4]
    assert st["mean"] == pytest.approx(mean, abs=1e-12)
    assert st["sd"] == pytest.approx(0.0458258, abs=1e-7)
    assert st["lo"] == pytest.approx(mean - 2.7764451 * se, abs=1e-6)  # -0.1069002
    assert st["hi"] == pytest.approx(mean + 2.7764451 * se, abs=1e-6)  # +0.0069002
    assert st["lo"] == pytest.approx(-0.1069002, abs=1e-6)
    t = abs(mean) / se  # 2.43975
    assert st["p"] == pytest.approx(2 * (1 - t4_cdf(t)), abs=1e-9)
    assert st["p"] == pytest.approx(0.0712276, abs=1e-6)
    assert st["wins"] == 4

    # a diverged seed is excluded and reported, not averaged in
    treat[2] = float("nan")
    st = summarize.paired_stats(base, treat)
    assert st["n"] == 4 and st["excluded"] == [2] and st["mean"] == pytest.approx(-0.27 / 4)


def test_steps_to_reach_interpolates_linearly():
    steps, losses = [10, 20, 30, 40, 50, 60], [5.0, 4.5, 4.2, 3.9, 3.8, 3.7]
    # 4.0 lies between step 30 (4.2) and step 40 (3.9): 30 + 10 * 0.2 / 0.3
    assert summarize.steps_to_reach(steps, losses, 4.0) == pytest.approx(36.666667, abs=1e-6)
    assert summarize.steps_to_reach(steps, losses, 3.9) == 40.0   # exactly on an evaluation
    assert summarize.steps_to_reach(steps, losses, 3.5) is None   # never reached
    assert summarize.steps_to_reach(steps, losses, 6.0) == 10.0   # at the first evaluation: its step
    # a non-finite evaluation before the crossing: no line through it, the crossing's step
    assert summarize.steps_to_reach([10, 20], [float("nan"), 3.0], 4.0) == 20.0


def write_run(root: Path, name: str, optim: str, seed: int, evals: list[tuple[int, float]]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"model": {"name": "tiny"}, "train": {"seed": seed}, "schedule": {"warmup_steps": 0},
           "optim": {"name": optim, "lr": 1e-2, "beta1": 0.9}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for step in range(1, 61):
        beta = (0.8 if step == 13 else 0.9) if optim == "am_adamw" else None
        loss = 8.0 if step == 12 else 6.0  # one loss spike at step 12, the β dip one step later
        lines.append({"kind": "train", "step": step, "tokens": step * 4096, "loss": loss, "lr": 1e-2,
                      "grad_norm": 1.0, "beta": beta, "beta_min": beta, "beta_max": beta})
        lines += [{"kind": "eval", "step": s, "tokens": s * 4096, "val_loss": v} for s, v in evals if s == step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "DONE").touch()
    return run


@pytest.fixture
def study_root(tmp_path):
    root = tmp_path / "study"
    for seed, (b, d) in enumerate(zip(BASE, DIFFS)):
        write_run(root, f"adamw-nowarmup-s{seed}", "adamw", seed, [(20, b + 0.6), (40, b + 0.2), (60, b)])
        write_run(root, f"am_adamw-nowarmup-s{seed}", "am_adamw", seed, [(20, b + 0.6), (40, b + 0.2), (60, b + d)])
    return root


def test_speedup_by_hand(study_root):
    runs = load_runs([str(study_root)])
    arms = summarize.arms_of(runs)
    assert sorted(arms) == ["adamw-nowarmup", "am_adamw-nowarmup"]
    sp = summarize.speedup(arms["adamw-nowarmup"], arms["am_adamw-nowarmup"])
    # TREAT reaches BASE's final loss b between step 40 (b + 0.2) and 60 (b + d) when d < 0:
    # 40 + 20 * 0.2 / (0.2 - d); the seed with d = +0.02 never does.
    by_hand = [40 + 20 * 0.2 / (0.2 - d) for d in DIFFS if d < 0]  # 53.333, 56, 54.286, 56.667
    assert (sp["n"], sp["reached"]) == (5, 4)
    assert sp["per_seed"][2] == (None, None)
    assert sp["steps"] == pytest.approx(sum(by_hand) / 4, abs=1e-9)          # 55.0714
    assert sp["ratio"] == pytest.approx(sum(60 / s for s in by_hand) / 4, abs=1e-9)  # 1.0901
    assert sp["steps"] == pytest.approx(55.0714, abs=1e-4) and sp["ratio"] == pytest.approx(1.0901, abs=1e-4)
    reach, ratio = summarize.mean_curve_speedup(arms["adamw-nowarmup"], arms["am_adamw-nowarmup"])
    assert reach == pytest.approx(56.0, abs=1e-9) and ratio == pytest.approx(60 / 56, abs=1e-9)


def test_study_tables_end_to_end(study_root, tmp_path):
    out = tmp_path / "results.md"
    res = subprocess.run([sys.executable, "-m", "tools.summarize", str(study_root), "--study",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `am_adamw-nowarmup` − `adamw-nowarmup`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # seed-mean curves: TREAT's mean curve is mean(BASE) + (0.6, 0.2, mean(DIFFS)) = 4.66, 4.26, 4.01
    # at steps 20, 40, 60; BASE's mean final 4.06 is reached at 40 + 20 * 0.2 / 0.25 = 56; 60 / 56
    # detectable at 80% power: (t_.975,4 = 2.7764 + t_.80,4 = 0.9410, printed tables) * sd / sqrt(5)
    assert cells[1:] == ["5", "-0.0500", "[-0.1069, +0.0069]", "0.071", "4/5", "0.0458",
                         f"{(2.7764 + 0.9410) * 0.0458258 / math.sqrt(5):.4f}", "55.1 (4/5 seeds)", "1.090×",
                         f"56.0 ({60 / 56:.3f}×)"]
    arm = next(line for line in text.splitlines() if line.startswith("| `am_adamw-nowarmup` |"))
    cells = [c.strip() for c in arm.strip("|").split("|")]
    # final loss mean over seeds: mean(BASE) + mean(DIFFS) = 4.06 - 0.05
    assert cells[1] == "5" and cells[2].startswith("4.0100 ± ")
    # β: 0.8 once per run (lowest = median = highest seed), 1 of 60 steps below β_max, and every dip
    # comes one step after the loss spike
    assert cells[3:6] == ["0.800 / 0.800 / 0.800", "1.7%", "5"]
    assert cells[6].startswith("5/5 ")
    assert cells[7] == f"{(59 * 0.9 + 0.8) / 60:.3f}"  # mean β over the 60 steps
    # a pair of arms without runs is left out, an arm pair given on the command line is used
    assert "am_adamw-warmup" not in text
    res = subprocess.run([sys.executable, "-m", "tools.summarize", str(study_root), "--study",
                          "--pair", "adamw-nowarmup:am_adamw-nowarmup"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "| `adamw-nowarmup` − `am_adamw-nowarmup` | 5 | +0.0500 | [-0.0069, +0.1069] | 0.071 | 1/5 |" in res.stdout


def test_export_keeps_what_the_tools_read(study_root, tmp_path):
    runs = load_runs([str(study_root / "am_adamw-nowarmup-s0")])
    (dest,) = summarize.export_runs(runs, tmp_path / "export")
    copy, orig = load_run(dest), runs[0]
    assert copy.done and copy.config == orig.config
    assert copy.final_eval() == orig.final_eval()
    assert list(copy.train["beta"]) == list(orig.train["beta"])


def test_paper_table_does_not_pool_batch_sizes_as_seeds(tmp_path):
    for batch, final in ((16, 4.5), (32, 4.2)):
        run = write_run(tmp_path, f"am_adamw-nowarmup-b{batch}-s0", "am_adamw", 0, [(60, final)])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["train"]["batch_size"] = batch
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    table, _ = summarize.paper_table(load_runs([str(tmp_path)]))
    assert "| tiny | no warmup | — | 4.200, batch 32 |" in table  # the better setting, not a mean of both


def test_another_momentum_is_another_setting(tmp_path):
    default = write_run(tmp_path, "adamw-nowarmup-s0", "adamw", 0, [(60, 4.0)])
    control = write_run(tmp_path, "adamw-beta1_0.84-nowarmup-s0", "adamw", 0, [(60, 3.0)])
    cfg = yaml.safe_load((control / "config.yaml").read_text())
    cfg["optim"]["beta1"] = 0.84
    (control / "config.yaml").write_text(yaml.safe_dump(cfg))
    a, b = load_run(default), load_run(control)
    assert a.group_label == "AdamW, no warmup, lr 1e-2, tiny"
    assert b.group_label == "AdamW β1 0.84, no warmup, lr 1e-2, tiny"
    table, _ = summarize.paper_table([a, b])
    assert "| tiny | no warmup | 4.000 | — | — | — | 3.000 |" in table  # its own column, not a second seed
