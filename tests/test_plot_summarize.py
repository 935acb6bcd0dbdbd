"""Results tools (tools/plot.py, tools/summarize.py, tools/runs.py) on synthetic run directories."""

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml

from tools import plot, summarize
from tools.runs import RunError, load_run, load_runs

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 4


def make_run(root, name, *, optim="am_adamw", policy="am", per_layer=False, warmup=10, seed=0, lr=1e-3,
             model="llama_60m", steps=100, final=4.0, nan_at=None, config=True, done=True):
    """A run dir whose last validation loss is exactly `final`; training loss decays towards it."""
    run = root / name
    run.mkdir(parents=True)
    if config:
        cfg = {"model": {"name": model}, "train": {"seed": seed}, "schedule": {"warmup_steps": warmup},
               "optim": {"name": optim, "lr": lr, "per_layer": per_layer, "beta_policy": policy}}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rng = np.random.default_rng(seed)
    am = optim.startswith("am_")
    lines = []
    for step in range(1, steps + 1):
        loss = final + 6 * math.exp(-step / 15) + 0.05 * rng.standard_normal()
        beta = 0.9 - 0.3 * math.exp(-step / 30) if am else None
        line = {"kind": "train", "step": step, "tokens": step * 4096, "loss": loss,
                "lr": lr * min(1, step / warmup) if warmup else lr, "grad_norm": 1.0, "beta": beta,
                "beta_min": beta and beta - 0.05, "beta_max": beta and beta + 0.05,
                "tokens_per_s": 1e4, "time": step * 0.1}
        if per_layer:
            line["betas"] = [beta - 0.02 * i for i in range(N_LAYERS)]
        if step == nan_at:
            line["loss"] = float("nan")  # json writes NaN, as the trainer would
        lines.append(json.dumps(line))
        if step % 20 == 0 or step == steps:
            val = final + 6 * math.exp(-step / 15) if step < steps else final
            # Eval lines without "kind": recognised by their val_loss.
            lines.append(json.dumps({"step": step, "tokens": step * 4096, "val_loss": val,
                                     "val_ppl": math.exp(val)}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if done:
        (run / "DONE").touch()
    return run


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "adamw_w_s0", optim="adamw", seed=0, final=4.10)
    make_run(root, "adamw_w_s1", optim="adamw", seed=1, final=4.00, nan_at=37)
    make_run(root, "am_w_s0", seed=0, final=3.96)
    make_run(root, "am_w_s1", seed=1, final=3.94, steps=80, done=False)  # shorter, still running
    make_run(root, "am_nw_s0", warmup=0, final=3.99, steps=60)
    make_run(root, "restart_100m", policy="restart", model="llama_100m", warmup=0, final=3.82)
    make_run(root, "am_perlayer", per_layer=True, final=3.93, nan_at=50)
    make_run(root, "bare", optim="sgd", final=4.5, config=False)
    return root


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, f"{path}: only {len(data)} bytes"
    assert np.asarray(mpimg.imread(path)).std() > 0.01, f"{path} is blank"


def test_load_run_parses_kinds_nan_and_per_layer(runs_root):
    run = load_run(runs_root / "am_perlayer")
    assert run.method == "AM-AdamW per-layer"
    assert run.label == "AM-AdamW per-layer, warmup, lr 1e-3, llama_60m, seed 0"
    assert len(run.train["step"]) == 100 and np.isnan(run.train["loss"][49])
    assert list(run.eval["step"]) == [20, 40, 60, 80, 100]
    assert run.betas.shape == (100, N_LAYERS)
    assert run.final_eval()[0] == pytest.approx(3.93)
    bare = load_run(runs_root / "bare")
    assert bare.method is None and bare.label == "bare" and not bare.config


def test_resumed_and_unfinished_lines(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    # A resume re-logs step 2; the live writer has not finished its last line.
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5}\n{"step": 2, "loss": 9}\n\n'
                                       '{"step": 2, "loss": 4, "lr": NaN}\n{"step": 3, "lo')
    loaded = load_run(run)
    assert list(loaded.train["step"]) == [1, 2] and list(loaded.train["loss"]) == [5, 4]
    assert "line 5: skipping unfinished last line" in capsys.readouterr().err


def test_expand_parent_dir_and_glob(runs_root):
    assert len(load_runs([str(runs_root)])) == 8
    assert [r.name for r in load_runs([str(runs_root / "am_w_*")])] == ["am_w_s0", "am_w_s1"]


def test_plot_writes_all_figures(runs_root, tmp_path):
    out = tmp_path / "figs"
    written = plot.plot_all(load_runs([str(runs_root)]), out, smoothing=5)
    names = {p.name for p in written}
    assert names == {"loss.png", "beta.png", "lr.png", "beta_spikes.png", "beta_layers_am_perlayer.png"}
    for path in written:
        assert_png(path)


def test_seeds_share_one_heatmap_and_dips_are_found(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path / "runs", f"pl_s{seed}", per_layer=True, seed=seed, warmup=0)
    runs = load_runs([str(tmp_path / "runs")])
    written = {p.name for p in plot.plot_all(runs, tmp_path / "figs", smoothing=3)}
    assert written == {"loss.png", "beta.png", "lr.png", "beta_spikes.png", "beta_layers_pl_s0.png"}
    # make_run's β: 0.9 - 0.3 exp(-step/30) for layer 0, 0.02 less per layer; the smallest layer's
    # β is below β_max - 0.02 while 0.3 exp(-s/30) + 0.06 > 0.02, i.e. on every one of the 100 steps
    dips, spikes = plot.spikes_and_dips(runs[0])
    assert list(dips) == list(range(1, 101))
    # the training loss rises by more than 0.1 only where its noise (0.05 sd) outweighs the decay
    loss = runs[0].train["loss"]
    assert list(spikes) == [s for s in range(2, 101) if loss[s - 1] - loss[s - 2] > 0.1]


def test_plot_skips_beta_without_am_runs(runs_root, tmp_path, capsys):
    written = plot.plot_all(load_runs([str(runs_root / "adamw_*")]), tmp_path, smoothing=5)
    assert {p.name for p in written} == {"loss.png", "lr.png"}
    assert "skipping beta.png" in capsys.readouterr().out


def test_smooth_ignores_nan_neighbours():
    y = np.array([1.0, np.nan, 3.0, np.inf, 5.0])
    np.testing.assert_allclose(plot.smooth(y, 2), [1, np.nan, 3, np.nan, 5])
    np.testing.assert_allclose(plot.smooth(np.array([1.0, 2, 3, 4]), 2), [1, 1.5, 2.5, 3.5])


def test_summary_tables(runs_root):
    text = summarize.summarize(load_runs([str(runs_root)]), paper=True)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in text.splitlines() if line.startswith("| llama")}
    header = next(line for line in text.splitlines() if line.startswith("| model | schedule"))
    assert header.split("|")[3:7] == [" AdamW ", " AM-AdamW ", " Clip ", " Restart "]
    warm = [c.strip() for c in rows["llama_60m", "warmup"].strip("|").split("|")]
    # Mean and sample std of two seeds, by hand: AdamW (4.10, 4.00), AM-AdamW (3.96, 3.94).
    assert warm[2] == f"4.050 ± {math.sqrt(2 * 0.05**2):.3f} (n=2)"
    assert warm[3] == f"3.950 ± {math.sqrt(2 * 0.01**2):.3f} (n=2)*"  # one seed unfinished
    assert warm[4] == warm[5] == "—"
    assert warm[6] == "3.930"  # the per-layer run gets its own column
    nowarm = [c.strip() for c in rows["llama_60m", "no warmup"].strip("|").split("|")]
    assert nowarm[2:4] == ["—", "3.990"]
    assert [c.strip() for c in rows["llama_100m", "no warmup"].strip("|").split("|")][5] == "3.820"
    assert "- `bare`: no config.yaml" in text
    # Per-run table: best run of llama_60m first; final ppl = exp(final loss).
    run_lines = [line for line in text.splitlines() if line.startswith("| `")]
    assert run_lines[0].startswith("| `am_perlayer`")
    assert f"| 3.930 | {math.exp(3.93):.2f} |" in run_lines[0]
    assert "| LLaMA 60M | 4.02 | 3.95 | 3.99 | 3.97 |" in text
    assert "| LLaMA 100M | 3.87 | 3.79 | 3.84 | 3.82 |" in text


def cli(tool, *args):
    return subprocess.run([sys.executable, "-m", f"tools.{tool.removesuffix('.py')}", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_end_to_end(runs_root, tmp_path):
    res = cli("summarize.py", runs_root, "--out", tmp_path / "results.md", "--paper")
    assert res.returncode == 0, res.stderr
    assert "| llama_60m | warmup | 4.050" in (tmp_path / "results.md").read_text()
    res = cli("plot.py", runs_root / "am_*", "--out", tmp_path / "figs", "--smooth", "3")
    assert res.returncode == 0, res.stderr
    assert_png(tmp_path / "figs" / "loss.png")


@pytest.mark.parametrize("content, message", [
    ('{"step": 1, "loss": 3}\n{"step": 2, loss: 3}\n', "line 2: not valid JSON"),
    ('{"step": 1, "loss": 3}\n[1, 2]\n', "line 2: expected a JSON object"),
    ('{"step": 1, "loss": "high"}\n', 'line 1: "loss" is "high", not a number'),
    ('{"loss": 3}\n', 'line 1: missing or non-numeric "step"'),
])
def test_malformed_metrics_is_one_clear_line(tmp_path, content, message):
    run = tmp_path / "x"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    res = cli("summarize.py", run)
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: {run / 'metrics.jsonl'} {message}")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_missing_metrics(tmp_path, capsys):
    run = tmp_path / "x"
    run.mkdir()
    (run / "config.yaml").write_text("optim: {name: adamw}\n")
    res = cli("summarize.py", run)
    assert (res.returncode, res.stderr) == (2, f"error: {run}: no metrics.jsonl (is this a run directory?)\n")
    assert plot.main([str(run), "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.jsonl (is this a run directory?)" in capsys.readouterr().err
    empty = tmp_path / "empty"  # neither a run nor a parent of runs
    empty.mkdir()
    with pytest.raises(RunError, match=r"empty: no metrics.jsonl \(is this a run directory\?\)"):
        load_runs([str(empty)])


def test_bad_config_number(tmp_path):
    run = make_run(tmp_path, "x")
    (run / "config.yaml").write_text("optim: {name: adamw, lr: fast}\n")
    res = cli("summarize.py", run)
    assert (res.returncode, res.stderr) == (2, f"error: {run / 'config.yaml'}: optim.lr is 'fast', not a number\n")


def test_bundle_reads_back_like_the_run_directories(runs_root, tmp_path):
    """One compact file for many runs (summarize --bundle): the tools read the same numbers from it."""
    runs = load_runs([str(runs_root)])
    bundle = tmp_path / "b.jsonl"
    assert summarize.main([str(runs_root), "--bundle", str(bundle)]) == 0
    assert len(bundle.read_text().splitlines()) == len(runs)
    back = {r.name: r for r in load_runs([str(bundle)])}
    for run in runs:
        other = back[run.name]
        assert other.config == run.config and other.done == run.done
        assert other.final_eval() == pytest.approx(run.final_eval(), rel=1e-5, nan_ok=True)
        np.testing.assert_allclose(other.train["loss"], run.train["loss"], rtol=1e-5)
        if run.betas is not None:
            np.testing.assert_allclose(other.betas, run.betas, rtol=1e-5)
    assert [r.name for r in load_runs([f"{bundle}#am_*"])] == sorted(n for n in back if n.startswith("am_"))


def test_bundle_add_keeps_the_earlier_runs_and_replaces_same_names(runs_root, tmp_path):
    """--bundle --add: a study finished in stages grows one bundle; without --add the file is rewritten."""
    runs = load_runs([str(runs_root)])
    assert len(runs) >= 3
    first, rest = runs[:2], runs[1:]  # runs[1] in both stages
    bundle = tmp_path / "b.jsonl"
    assert summarize.main([str(r.path) for r in first] + ["--bundle", str(bundle)]) == 0
    items = [json.loads(line) for line in bundle.read_text().splitlines()]
    items[1]["config"] = {"stale": True}  # runs[1]'s first-stage line, marked
    bundle.write_text("".join(json.dumps(item) + "\n" for item in items))
    assert summarize.main([str(r.path) for r in rest] + ["--bundle", str(bundle), "--add"]) == 0
    lines = [json.loads(line) for line in bundle.read_text().splitlines()]
    assert sorted(item["run"] for item in lines) == sorted(r.name for r in runs)  # each run once
    by_name = {item["run"]: item for item in lines}
    assert by_name[runs[1].name]["config"] == runs[1].config  # replaced by the second stage's line
    assert by_name[runs[0].name]["config"] == runs[0].config  # kept from the first
    assert summarize.main([str(r.path) for r in rest] + ["--bundle", str(bundle)]) == 0
    assert sorted(json.loads(line)["run"] for line in bundle.read_text().splitlines()) == sorted(r.name for r in rest)
    # a bundle as input: one line that says what to do, and the bundle is left as it was
    before = bundle.read_text()
    res = cli("summarize.py", bundle, "--bundle", tmp_path / "c.jsonl", "--add")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "with --add" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "c.jsonl").exists()
    assert bundle.read_text() == before
