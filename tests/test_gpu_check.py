"""tools/gpu_check.sh stays runnable without a GPU: it refuses at once, its dry run prints and validates
every command, and its table helper reads what the parts leave behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check_table as T  # noqa: E402


def _run(*args, env=None, timeout=120):
    return subprocess.run(["bash", "tools/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine")
def test_without_a_gpu_it_exits_2_at_once_with_one_line(tmp_path):
    r = _run(env={"GPU_CHECK_DIR": str(tmp_path / "w")}, timeout=10)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no CUDA GPU" in r.stderr and "--dry-run" in r.stderr


def test_unknown_argument_is_one_line():
    r = _run("--gpu", timeout=10)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--dry-run" in r.stderr


def test_dry_run_prints_every_command_validates_them_and_writes_the_table(tmp_path):
    r = _run("--dry-run", env={"GPU_CHECK_DIR": str(tmp_path / "w"), "OUT": str(tmp_path / "out")})
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table in r.stdout and table.startswith("### tools/gpu_check.sh")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [p["name"] for p in T.read_parts(tmp_path / "w")]
    assert len(rows) == len(names) == 21  # install, prepare, tests, 4 bench, 8 smoke, sync debug, 60M, 4 study
    for name in ("smoke_zero2_offload_compile", "perf60m", "study_am_adamw_nowarmup"):
        assert any(line.startswith(f"{name}: ") and "train.py" in line for line in r.stdout.splitlines()), name
    assert all(row.split(" | ")[1] in ("dry-run", "n/a") for row in rows)


def test_validate_rejects_a_command_that_would_not_parse(tmp_path):
    (tmp_path / "parts.tsv").write_text("smoke_ddp\tdry\t0\tpython3 train.py model.name=tiny train.bogus=1\n"
                                        "perf60m\tdry\t0\tpython3 train.py --config configs/c4/llama_60m.yaml\n")
    assert T.validate(tmp_path) == 1


def test_table_reads_logs_and_metrics(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "parts.tsv").write_text(
        "bench_20m_float32\t0\t12\tpython3 tools/bench_optimizer.py\n"
        "smoke_zero2_offload\t1\t30\tpython3 train.py\n"
        "study_am_adamw_nowarmup\ttimeout@90s\t90\tpython3 train.py\n"
        "sync_debug\tna\t0\tmissing: train.sync_debug in amllm/config.py\n")
    (tmp_path / "logs" / "bench_20m_float32.log").write_text(
        "device=cuda dtype=float32\n  AdamW fused                          0.50 ms/step   (min 0.4)\n"
        "  AMAdamW fused                        0.80 ms/step   (min 0.7)\n")
    (tmp_path / "logs" / "smoke_zero2_offload.log").write_text(
        "Traceback (most recent call last):\n  File \"x\", line 1\nRuntimeError: No backend type associated\n")
    run = tmp_path / "study_am_adamw_nowarmup"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"kind": "train", "step": 10, "loss": 9.0, "beta_min": 0.9, "beta_max": 0.9},
        {"kind": "train", "step": 20, "loss": 7.5, "beta_min": 0.71, "beta_max": 0.9}]) + "\n")
    rows = T.table(tmp_path, "gpu", 100).splitlines()[4:]
    assert "| ok | AMAdamW fused 0.80 ms vs AdamW fused 0.50 ms = **1.60x**" in rows[0]
    assert "| FAIL | exit 1: RuntimeError: No backend type associated |" in rows[1]
    assert "| cut | step 20: train loss 7.500, β in [0.710, 0.900]; cut at its budget (90s) |" in rows[2]
    assert "| n/a | (missing: train.sync_debug in amllm/config.py) |" in rows[3]
