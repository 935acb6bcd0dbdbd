"""Config: recipes, overrides, and one clear line for every mistake."""

import pytest

from amllm.config import ConfigError, load_config, save_config


def test_defaults_are_the_cpu_demo_job():
    cfg = load_config()
    assert cfg.data.source == "sotu" and cfg.model.name == "tiny" and cfg.train.precision == "fp32"


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-3", "schedule.warmup_steps=0", "optim.per_layer=true",
                             "train.max_tokens=1e6", "data.train_tokens=null"])
    assert cfg.optim.lr == 3e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.warmup_steps == 0 and cfg.optim.per_layer is True
    assert cfg.train.max_tokens == 1_000_000 and cfg.data.train_tokens is None
    # token budget wins over max_steps: 1e6 // (16 * 256)
    assert cfg.total_steps() == 1_000_000 // (16 * 256)


def test_recipe_base_inheritance_and_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.002\n  weight_decay: 0.1\ntrain:\n  seed: 3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  lr: 0.005\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.seed=4"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.seed) == (0.005, 0.1, 4)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], r"unknown config key 'optim.lrr'; did you mean 'lr'\?"),
    (["bogus.x=1"], r"unknown config key 'bogus'"),
    (["optim.lr=fast"], r"optim.lr='fast' must be a number"),
    (["optim.lr=-1"], r"optim.lr=-1.0 must be >= 0"),
    (["optim.name=adam"], r"optim.name='adam' is not valid; choose one of adamw, am_adamw, sgd, am_sgd"),
    (["optim.beta1=1.0"], r"optim.beta1=1.0 must be in \[0, 1\)"),
    (["train.batch_size=2.5"], r"train.batch_size=2.5 must be an integer"),
    (["train.precision=fp16"], r"train.precision='fp16' is not valid"),
    (["optim.per_layer=maybe"], r"optim.per_layer='maybe' must be false, true \(one beta per tensor\) or block"),
    (["optim.name=adamw", "optim.per_layer=true"], r"optim.per_layer applies to am_adamw/am_sgd only"),
    (["data.source=c4_local"], r"data.source=c4_local needs data.path=DIR"),
    (["parallel.backend=deepspeed"], r"needs parallel.deepspeed_config="),
    (["parallel.dist_backend=mpi"], r"parallel.dist_backend='mpi' is not valid; choose one of auto, nccl, gloo"),
    (["optim.lr"], r"override 'optim.lr' must look like section.key=value"),
    (["train.max_tokens=100"], r"train.max_tokens=100 is less than one batch"),
])
def test_bad_values_give_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides).total_steps()
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"not found; see configs/"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match=r"includes itself"):
        load_config(tmp_path / "loop.yaml")


def test_every_shipped_recipe_and_grid_loads():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    grids = sorted(root.glob("configs/**/*_grid.yaml"))  # sweep grids, not recipes
    recipes = [p for p in (root / "configs").rglob("*.yaml") if p not in grids]
    assert len(recipes) > 40 and grids
    for p in recipes:
        load_config(p).total_steps()
    for g in grids:  # the sweep validates every grid point's config before it would run anything
        res = subprocess.run([sys.executable, "-m", "tools.sweep", "--grid", str(g), "--dry-run"], cwd=root,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]


def test_console_entry_point_runs_train_py():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['amllm-train', '--help']; "
                          "from amllm.cli import main; main()"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--eval-only" in res.stdout, res.stderr[-1000:]
