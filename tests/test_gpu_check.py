"""tools/gpu_check.sh stays runnable without a GPU: it refuses at once, its dry run prints and validates
every command, and its table helper reads what the parts leave behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from tools import gpu_check_table as T


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


def test_dry_run_prints_and_validates_exactly_the_gpu_commands_within_the_budget(tmp_path):
    r = _run("--dry-run", env={"GPU_CHECK_DIR": str(tmp_path / "w"), "OUT": str(tmp_path / "out")})
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table in r.stdout and table.startswith("### tools/gpu_check.sh")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    parts = T.read_parts(tmp_path / "w")
    assert len(rows) == len(parts) == 21
    assert all(row.split(" | ")[1] == "dry-run" for row in rows)
    commands = {p["name"]: p["note"] for p in parts}
    for name in ("sync_fsdp2", "sync_zero2", "sync_zero3", "ddp_2ranks_gloo", "resume_fsdp2_to_8", "perf60m",
                 "default_bf16_pure"):
        assert "train.py" in commands[name] and "train.device=cuda" in commands[name], name
    assert not any("train.device=cpu" in c or "TRITON_INTERPRET" in c for c in commands.values())
    assert "AMLLM_TEST_DEVICE=cuda" in commands["optim_cuda"] and "eval.every=10" in commands["perf60m"]
    # the budgets add up: group A runs concurrently (its chains' parts in turn), the rest in turn
    group = {"optim_cuda", "smoke_ddp", "sync_ddp_compile", "sync_fsdp2", "sync_zero2", "sync_zero3",
             "smoke_zero2_offload", "ddp_2ranks_gloo"}
    chains = [("resume_zero2_to_4", "resume_fsdp2_to_8", "straight_fsdp2", "resume_matches"),
              ("default_fp32", "default_bf16_pure", "bf16_pure_matches")]
    budget = {p["name"]: p["budget"] for p in parts}
    window = max([budget[n] for n in group] + [sum(budget[n] for n in c) for c in chains])
    rest = sum(b for n, b in budget.items() if n not in group and not any(n in c for c in chains))
    assert window + rest <= 300, (window, rest)


def test_budgets_that_do_not_add_up_stop_it_before_anything_runs(tmp_path):
    r = _run("--dry-run", env={"GPU_CHECK_DIR": str(tmp_path / "w"), "GPU_CHECK_BUDGET_S": "200"}, timeout=20)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "add up to 300 s, over the total of 200 s" in r.stderr


@pytest.mark.slow
def test_a_failed_part_fails_the_check(tmp_path):
    """--cpu with one part: green as it is, non-zero with a crash planted in its training run."""
    ok = _run("--cpu", env={"GPU_CHECK_DIR": str(tmp_path / "ok"), "GPU_CHECK_ONLY": "smoke_ddp"}, timeout=900)
    assert ok.returncode == 0 and "All parts passed." in ok.stdout, ok.stdout + ok.stderr
    bad = _run("--cpu", env={"GPU_CHECK_DIR": str(tmp_path / "bad"), "GPU_CHECK_ONLY": "smoke_ddp",
                             "AMLLM_TEST_CRASH_AT_STEP": "2"}, timeout=900)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "| FAIL | exit 1: [test] rank 0 crashing at step 2" in bad.stdout and "NOT ACCEPTED" in bad.stdout


def _metrics(run: Path, losses: dict, val=None):
    run.mkdir(parents=True)
    recs = [{"kind": "train", "step": k, "loss": v} for k, v in losses.items()]
    recs += [{"kind": "eval", "step": max(losses), "val_loss": val}] if val is not None else []
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_same_loss_compares_the_steps_after_the_resume_and_the_final_eval(tmp_path):
    _metrics(tmp_path / "ref", {3: 9.0, 4: 8.0, 5: 7.0}, val=6.0)
    _metrics(tmp_path / "near", {3: 1.0, 4: 8.004, 5: 7.0}, val=6.0)
    _metrics(tmp_path / "far", {4: 8.0, 5: 7.1}, val=6.0)
    assert T.same_loss(tmp_path / "near", tmp_path / "ref", 1e-3, after_step=3)[0]  # step 3 not compared
    assert not T.same_loss(tmp_path / "near", tmp_path / "ref", 1e-4, after_step=3)[0]
    ok, line = T.same_loss(tmp_path / "far", tmp_path / "ref", 1e-3, after_step=3)
    assert not ok and "worst step 5 loss: 7.10000 vs 7.00000" in line and "OUTSIDE" in line
    assert T.same_loss(tmp_path / "far", tmp_path / "ref", 0.01, val_only=True)[0]
    assert not T.same_loss(tmp_path / "far", tmp_path / "nothing", 0.01)[0]
    assert T.main(["--same-loss", str(tmp_path / "far"), str(tmp_path / "ref"), "--rtol", "1e-3"]) == 1


def test_readme_gets_the_table_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n## GPU status\n<!-- gpu-status:start -->\nold\n<!-- gpu-status:end -->\n## next\n")
    T.put_in_readme(readme, "| table |\n")
    assert readme.read_text() == ("# x\n## GPU status\n<!-- gpu-status:start -->\n| table |\n"
                                  "<!-- gpu-status:end -->\n## next\n")
    assert "<!-- gpu-status:start -->" in (ROOT / "README.md").read_text()


def test_validate_rejects_a_command_that_would_not_parse(tmp_path):
    (tmp_path / "parts.tsv").write_text("smoke_ddp\tdry\t0\t120\tpython3 train.py model.name=tiny train.bogus=1\n"
                                        "perf60m\tdry\t0\t70\tpython3 train.py --config configs/c4/llama_60m.yaml\n")
    assert T.validate(tmp_path) == 1


def test_table_reads_logs_and_metrics(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "parts.tsv").write_text(
        "bench_20m_float32\t0\t12\t20\tpython3 -m tools.bench_optimizer\n"
        "smoke_zero2_offload\t1\t30\t120\tpython3 train.py\n"
        "study_am_adamw_nowarmup\ttimeout@90s\t90\t90\tpython3 train.py\n"
        "sync_debug\tna\t0\t0\tmissing: train.sync_debug in amllm/config.py\n")
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
    assert not T.passed(tmp_path, "gpu") and T.main([str(tmp_path)]) == 1
