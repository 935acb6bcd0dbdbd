"""tools/sweep.py on a micro model: builds the grid, skips finished runs, resumes interrupted ones,
reports failures, prints cluster commands."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from amllm.metrics import read_metrics

STEPS = 4


def sweep(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AMLLM_TEST_STOP_AT_STEP"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "tools.sweep", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def grid_args(micro_model, data_dir, tmp_path):
    """adamw/am_adamw x warmup/none at one lr and seed: 4 micro runs of STEPS steps."""
    sets = {"model.name": micro_model, "data.data_dir": data_dir, "data.seq_len": 32, "train.batch_size": 2,
            "train.micro_batch_size": 2, "train.max_steps": STEPS, "eval.every": 0, "eval.tokens": 256,
            "checkpoint.every": 2, "train.threads": 1}
    def make(out: Path = tmp_path / "sweep", **extra) -> list[str]:
        args = ["--out", str(out), "--optims", "adamw", "am_adamw", "--warmup", "1", "0",
                "--lrs", "1e-3", "--seeds", "0", "--status-every", "1"]
        for k, v in {**sets, **extra}.items():
            args += ["--set", f"{k}={v}"]
        return args
    return make


NAMES = ["adamw-warmup-lr1e-3-s0", "adamw-nowarmup-lr1e-3-s0",
         "am_adamw-warmup-lr1e-3-s0", "am_adamw-nowarmup-lr1e-3-s0"]


def steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run, "train")]


def test_grid_runs_skips_done_and_resumes_interrupted(grid_args, tmp_path):
    out = tmp_path / "sweep"
    # one grid point pre-empted after step 1 (a checkpoint is written there), as a killed job leaves it
    first = sweep(grid_args(out, **{"checkpoint.every": 4}) + ["--optims", "am_adamw", "--warmup", "0"],
                  {"AMLLM_TEST_STOP_AT_STEP": "1"})
    assert first.returncode == 75, first.stdout + first.stderr
    interrupted = out / "am_adamw-nowarmup-lr1e-3-s0"
    assert (interrupted / "step-1").is_dir() and not (interrupted / "DONE").exists()
    assert "stopped at step 1" in first.stdout and "run the same command again" in first.stdout

    full = sweep(grid_args(out))
    assert full.returncode == 0, full.stdout + full.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)
    for name in NAMES:
        run = out / name
        assert (run / "DONE").exists()
        assert steps(run) == list(range(1, STEPS + 1)), name  # the resumed run reads as one run
    assert "am_adamw-nowarmup-lr1e-3-s0: resuming after step 1" in full.stdout
    assert "[4/4]" in full.stdout and "4/4 done, 0 failed" in full.stdout
    cfg = (out / "am_adamw-nowarmup-lr1e-3-s0" / "config.yaml").read_text()
    assert "name: am_adamw" in cfg and "warmup_steps: 0" in cfg

    mtimes = {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in NAMES}
    again = sweep(grid_args(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skip (DONE)") == 4
    assert {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in NAMES} == mtimes


def test_failing_run_is_reported_and_sweep_goes_on(grid_args, tmp_path):
    out = tmp_path / "sweep"
    # break one run for real: its directory holds a checkpoint of another model, which train.py
    # refuses (exit 2) -- a failure the sweep only sees when the run starts.
    bad = out / "adamw-warmup-lr1e-3-s0" / "step-1"
    bad.mkdir(parents=True)
    (bad / "meta.json").write_text(json.dumps({"step": 1, "model_fingerprint": "another-model"}))

    res = sweep(grid_args(out) + ["--optims", "adamw"])
    assert res.returncode == 1
    assert "adamw-warmup-lr1e-3-s0: FAILED (exit 2)" in res.stdout
    assert (out / "adamw-nowarmup-lr1e-3-s0" / "DONE").exists()  # the next run still ran
    assert "1/2 done, 1 failed" in res.stdout
    assert "another model architecture" in res.stdout  # the failed run's log tail is shown


def test_print_commands_and_dry_run(grid_args, tmp_path):
    out = tmp_path / "sweep"
    base = grid_args(out) + ["--config", "configs/cpu/study.yaml", "--lrs", "1e-3", "3e-3", "--seeds", "0", "1"]
    lines = {}
    for launcher in ("torchrun", "deepspeed", "slurm"):
        res = sweep(base + ["--print-commands", launcher])
        assert res.returncode == 0, res.stderr
        lines[launcher] = [shlex.split(line) for line in res.stdout.splitlines()]
        assert len(lines[launcher]) == 16
    assert not out.exists()  # printing runs nothing
    tr = lines["torchrun"][0]
    assert tr[:4] == ["torchrun", "--nproc_per_node", "8", "train.py"]
    assert tr[4:6] == ["--config", "configs/cpu/study.yaml"]
    assert f"run_dir={out}/adamw-warmup-lr1e-3-s0" in tr and "optim.lr=0.001" in tr and "train.seed=0" in tr
    ds = lines["deepspeed"][-1]
    assert ds[:4] == ["deepspeed", "--num_gpus", "8", "train.py"]
    assert ds[-2:] == ["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2_bf16.json"]
    assert f"run_dir={out}/am_adamw-nowarmup-lr3e-3-s1" in ds
    sl = lines["slurm"][0]
    assert sl[:3] == ["sbatch", "--job-name=adamw-warmup-lr1e-3-s0", "launch/slurm.sbatch"]
    assert sl[3:5] == ["--config", "configs/cpu/study.yaml"]
    # every launcher runs the same grid: the train.py arguments agree
    assert [cmd[4:] for cmd in lines["torchrun"]] == [cmd[3:] for cmd in lines["slurm"]]

    dry = sweep(base + ["--dry-run"])
    assert dry.returncode == 0 and "16 runs in" in dry.stdout and not out.exists()


def test_am_only_axis_does_not_multiply_adamw_and_bad_keys_stop_early(grid_args, tmp_path):
    res = sweep(grid_args() + ["--warmup", "0", "--axis", "optim.beta_policy=am,clip", "--dry-run"])
    assert res.returncode == 0, res.stderr
    names = [line.split()[1] for line in res.stdout.splitlines()[1:]]
    assert names == ["adamw-nowarmup-lr1e-3-s0", "am_adamw-nowarmup-lr1e-3-beta_policy-am-s0",
                     "am_adamw-nowarmup-lr1e-3-beta_policy-clip-s0"]
    bad = sweep(grid_args() + ["--set", "optim.lrr=1", "--dry-run"])
    assert bad.returncode == 2 and "unknown config key 'optim.lrr'" in bad.stderr


def test_named_arms_grid(grid_args, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "seeds: [0, 1]\n"
        "arms:\n"
        "  - {name: adamw-warmup, set: {optim.name: adamw, schedule.warmup_steps: 1}}\n"
        "  - {name: am-clip, seeds: [1], set: {optim.name: am_adamw, optim.beta_policy: clip, optim.beta_min: 0.5}}\n"
        "  - {name: am-pl, set: {optim.name: am_adamw, optim.per_layer: true}}\n")
    # grid_args' --optims/--warmup/--lrs/--seeds belong to the other grid format: keep --out and the sets
    args, drop = [], False
    for a in grid_args():
        if a.startswith("--"):
            drop = a in ("--optims", "--warmup", "--lrs", "--seeds")
        if not drop:
            args.append(a)
    res = sweep(["--grid", str(grid), *args, "--dry-run"])
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()[1:]]
    # seeds outermost; the clip arm only on its own seed list
    assert [r[1] for r in rows] == ["adamw-warmup-s0", "am-pl-s0", "adamw-warmup-s1", "am-clip-s1", "am-pl-s1"]
    clip = next(r for r in rows if r[1] == "am-clip-s1")
    assert clip[-4:] == ["optim.name=am_adamw", "optim.beta_policy=clip", "optim.beta_min=0.5", "train.seed=1"]
    assert next(r for r in rows if r[1] == "am-pl-s0")[-2] == "optim.per_layer=true"

    # the arms format does not mix with the optimizer x warmup x lr grid, names are unique and clean
    mixed = sweep(["--grid", str(grid), *args, "--optims", "adamw", "--dry-run"])
    assert mixed.returncode == 2 and "arms and optims do not combine" in mixed.stderr
    grid.write_text("arms:\n  - {name: a, set: {optim.name: adamw}}\n  - {name: a, set: {optim.name: adamw}}\n")
    dup = sweep(["--grid", str(grid), *args, "--dry-run"])
    assert dup.returncode == 2 and "must be unique" in dup.stderr
    grid.write_text("arms:\n  - {name: a, set: {optim.lrr: 1}}\n")
    bad = sweep(["--grid", str(grid), *args, "--dry-run"])
    assert bad.returncode == 2 and "arm a: unknown config key 'optim.lrr'" in bad.stderr


def test_study_grid_file_is_the_documented_study():
    res = sweep(["--grid", "configs/cpu/study_beta_grid.yaml", "--out", "runs/never", "--dry-run"])
    assert res.returncode == 0, res.stderr
    names = [line.split()[1] for line in res.stdout.splitlines()[1:]]
    arms: dict[str, int] = {}
    for name in names:
        arm = name.rsplit("-s", 1)[0]
        arms[arm] = arms.get(arm, 0) + 1
    assert arms == {"adamw-warmup": 10, "adamw-nowarmup": 10, "am_adamw-warmup": 10, "am_adamw-nowarmup": 10,
                    "am_adamw-clip-nowarmup": 5, "am_adamw-restart-nowarmup": 5, "am_adamw-perlayer-nowarmup": 10,
                    "adamw-beta1_0.84-nowarmup": 5}
