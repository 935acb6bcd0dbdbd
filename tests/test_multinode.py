"""Multi-node for real: two hosts (network namespaces on a bridge, tools/cluster.sh) running our launchers
across a network -- torchrun on each host, the deepspeed launcher over ssh/pdsh with a hostfile, sbatch
on a 2-node SLURM cluster -- each against a 1-process reference on the same global batch; and the faults
across hosts: SLURM requeue, a host killed mid-run, an unreachable peer, a second submission from the
other host. Each host's own name resolves to loopback (as on Debian), so none of the runs gives gloo an
interface hint: train.py must pick the interface itself.

Root, `ip netns`, openssh-server, pdsh and slurm (.ci/run installs them); skipped with the rig's reason
where namespaces are impossible. About 5 minutes on 2 cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amllm.metrics import read_metrics

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = str(ROOT / "tools" / "cluster.sh")
PREFIX = "amt"  # hosts amt1, amt2 (tools/cluster.sh's default prefix is left to people trying it by hand)
H1, H2 = f"{PREFIX}1", f"{PREFIX}2"
MASTER = "10.77.0.1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "CLUSTER_DIR": str(state), "CLUSTER_PREFIX": PREFIX}
    r = subprocess.run(["bash", CLUSTER, "up", "--hosts", "2", "--slurm"], env=env, capture_output=True, text=True,
                       timeout=180, check=False)
    if r.returncode == 3:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr
    yield env
    subprocess.run(["bash", CLUSTER, "down"], env=env, capture_output=True, timeout=120, check=False)


def host_env(cluster: dict, **extra: str) -> dict:
    """What a user on a host has: the virtualenv active, the repository on PYTHONPATH, offline hubs."""
    venv = sys.prefix if sys.prefix != sys.base_prefix else ""
    env = {**cluster, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRITON_INTERPRET": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))}
    if venv:
        env.update(VIRTUAL_ENV=venv, PATH=f"{venv}/bin:{os.environ['PATH']}")
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # no hint: the point of these tests
        env.pop(var, None)
    return {**env, **extra}


def on(cluster: dict, host: str, cmd: list[str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", CLUSTER, "exec", host, "--", *cmd], cwd=ROOT, env=host_env(cluster, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def overrides(run: Path, micro_model: str, data_dir: str, **extra) -> list[str]:
    base = {"run_dir": str(run), "model.name": micro_model, "data.data_dir": data_dir, "data.seq_len": 64,
            "train.batch_size": 4, "train.micro_batch_size": 2, "train.max_steps": 6, "schedule.warmup_steps": 2,
            "eval.every": 3, "eval.tokens": 2048, "checkpoint.every": 3, "log.progress": False, "train.threads": 1,
            "train.check_every": 1, "parallel.timeout_s": 30}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_model, data_dir):
    """One process, the same global batch (4 sequences as 2 micro-batches of 2): what every run must match."""
    runs = {}

    def get(steps: int) -> Path:
        if steps not in runs:
            run = tmp_path_factory.mktemp("reference") / "run"
            r = subprocess.run([sys.executable, "train.py", *overrides(run, micro_model, data_dir,
                                                                         **{"train.max_steps": steps})],
                               cwd=ROOT, env=host_env({**os.environ}), capture_output=True, text=True, timeout=600,
                               check=False)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            runs[steps] = run
        return runs[steps]
    return get


def same_run(ref: Path, run: Path, steps: int, rel: float = 1e-5) -> None:
    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    ta, tb = [r for r in a if r["kind"] == "train"], [r for r in b if r["kind"] == "train"]
    tb = list({r["step"]: r for r in tb}.values())  # a resumed run may log a step again: the latest counts
    assert [r["step"] for r in tb] == [r["step"] for r in ta] == list(range(1, steps + 1))
    for ra, rb in zip(ta, tb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=rel, abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
        assert rb["beta"] == pytest.approx(ra["beta"], abs=1e-5), (ra["step"], ra["beta"], rb["beta"])
    assert (run / "DONE").exists()


def finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        pytest.fail(f"did not end within {timeout} s:\n{out[-3000:]}")
    return p.returncode, out


def torchrun_both(cluster, run_args: list[str], port: int, per_host: int = 1, **extra) -> list[subprocess.Popen]:
    return [on(cluster, host, ["bash", "launch/torchrun_multinode.sh", *run_args], NNODES="2", NODE_RANK=str(i),
               MASTER_ADDR=MASTER, MASTER_PORT=str(port), NPROC_PER_NODE=str(per_host), **extra)
            for i, host in enumerate((H1, H2))]


def wait_for(path: Path, timeout: float, procs=()) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} did not appear within {timeout} s"
        assert all(p.poll() is None for p in procs), "a host stopped early"
        time.sleep(0.5)


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("per_host", [1, 2])
def test_torchrun_two_hosts_without_an_interface_hint_match_one_process(cluster, reference, micro_model, data_dir,
                                                                         tmp_path, per_host):
    """2 hosts x 1 rank (2 sequences each) and 2 hosts x 2 ranks (1 each): the 4 sequences of one process."""
    run = tmp_path / "run"
    hosts = torchrun_both(cluster, overrides(run, micro_model, data_dir, **{"train.micro_batch_size": 2 // per_host}),
                          29521 + 10 * per_host, per_host)
    outs = [finish(p) for p in hosts]
    for rc, out in outs:
        assert rc == 0, out[-3000:]
    assert f"{2 * per_host} rank(s) x 1 micro-batch(es) of {2 // per_host} x 64" in outs[0][1], outs[0][1][-2000:]
    # each host chose the bridge interface itself (its own name resolves to loopback)
    assert f"[dist] {H1}: gloo over eth0 (10.77.0.1)" in outs[0][1]
    assert f"[dist] {H2}: gloo over eth0 (10.77.0.2)" in outs[1][1]
    same_run(reference(6), run, 6)


def test_deepspeed_launcher_reaches_the_second_host_over_ssh_with_the_environment(cluster, reference, micro_model,
                                                                                  data_dir, tmp_path):
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{H1} slots=1\n{H2} slots=1\n")
    p = on(cluster, H1, ["bash", "launch/deepspeed_multinode.sh", *overrides(run, micro_model, data_dir)],
           HOSTFILE=str(hostfile), MASTER_PORT="29522", DS_CONFIG="configs/deepspeed/zero2_fp32.json",
           AMLLM_TEST_ENV_REPORT="VIRTUAL_ENV,PATH,PYTHONPATH,HF_HUB_OFFLINE,OMP_NUM_THREADS,TORCH_EXTENSIONS_DIR")
    rc, out = finish(p, 900)
    assert rc == 0, out[-4000:]
    remote = json.loads((run / "env-rank1.json").read_text())
    assert remote["hostname"] == H2  # rank 1 really ran on the other host, started over ssh
    env = host_env(cluster)
    if env.get("VIRTUAL_ENV"):  # the virtualenv is active there (--venv_script), not only its python
        assert remote["VIRTUAL_ENV"] == env["VIRTUAL_ENV"], remote
        assert remote["PATH"].split(":")[0] == f"{env['VIRTUAL_ENV']}/bin", remote
    for var in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR"):  # carried by the DS_ENV_FILE
        assert remote[var] == env[var], (var, remote)
    assert str(ROOT) in remote["PYTHONPATH"].split(":")
    # ZeRO-2 over the network: the same losses and β as one process (fp32; reductions in another order)
    same_run(reference(6), run, 6, rel=1e-4)


def _squeue_state(cluster, job: str) -> str:
    r = subprocess.run(["bash", CLUSTER, "exec", H1, "--", "scontrol", "show", "job", job], env=cluster,
                       capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"JobState=(\S+)", r.stdout)
    return m.group(1) if m else r.stderr.strip()


def test_sbatch_on_two_nodes_requeued_mid_run_resumes_and_ends_as_one_process(cluster, reference, micro_model,
                                                                                data_dir, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    args = overrides(run, micro_model, data_dir, **{"train.max_steps": 8, "checkpoint.every": 6})
    sub = subprocess.run(["bash", CLUSTER, "exec", H1, "--", "sbatch", "--parsable", "--nodes", "2",
                          "--ntasks-per-node", "1", "--cpus-per-task", "1", "--gpus-per-node", "0", "--output",
                          str(log), "--open-mode", "append", "launch/slurm.sbatch", *args], cwd=ROOT,
                         env=host_env(cluster, MASTER_PORT="29523", AMLLM_TEST_STEP_SLEEP="1"),
                         capture_output=True, text=True, timeout=60, check=False)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]

    def exec1(*cmd):
        return subprocess.run(["bash", CLUSTER, "exec", H1, "--", *cmd], env=cluster, capture_output=True,
                              text=True, timeout=60, check=False)

    end = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and '"step": 2' in (run / "metrics.jsonl").read_text()):
        tail = log.read_text()[-3000:] if log.exists() else ""
        assert time.monotonic() < end, f"job {job} did not reach step 2: {tail}"
        time.sleep(0.5)
    assert exec1("scontrol", "requeue", job).returncode == 0  # SIGTERM to every task of the job's steps
    end = time.monotonic() + 180
    while "Exited with exit code 75" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < end, log.read_text()[-3000:]
        time.sleep(0.5)
    text = log.read_text()
    assert text.count("Exited with exit code 75") == 2, text[-3000:]  # every rank, on both nodes
    saved = re.search(r"stopped at step (\d+) \(SIGTERM\); checkpoint saved", text)
    assert saved and 2 <= int(saved.group(1)) < 8, text[-3000:]
    # a requeued job is held ~2 minutes (its EligibleTime); let it start now instead of waiting
    for _ in range(60):
        if _squeue_state(cluster, job) == "PENDING":
            break
        time.sleep(1)
    exec1("scontrol", "update", f"JobId={job}", "StartTime=now")
    end = time.monotonic() + 400
    while _squeue_state(cluster, job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        assert time.monotonic() < end, log.read_text()[-3000:]
        time.sleep(2)
    text = log.read_text()
    assert _squeue_state(cluster, job) == "COMPLETED", text[-3000:]
    assert f"resumed from {run}/step-{saved.group(1)}" in text, text[-3000:]
    same_run(reference(8), run, 8)


def test_a_host_killed_mid_run_stops_the_survivor_with_one_line_and_the_relaunch_resumes(
        cluster, reference, micro_model, data_dir, tmp_path):
    run = tmp_path / "run"
    args = overrides(run, micro_model, data_dir, **{"train.max_steps": 8, "checkpoint.every": 4,
                                                      "parallel.timeout_s": 20})
    hosts = torchrun_both(cluster, args, 29524, AMLLM_TEST_STEP_SLEEP="3")
    wait_for(run / "metrics.jsonl", 300, hosts)
    # meanwhile a second submission on the same run directory, from the other host, is refused by the lock
    rc, out = finish(on(cluster, H2, [sys.executable, "train.py", *args]), 300)
    assert rc == 2 and len(error_lines(out)) == 1 and "in use by another run" in error_lines(out)[0], out[-2000:]
    wait_for(run / "step-4" / "meta.json", 300, hosts)
    assert not (run / "step-8").exists(), "the run ended before the host could be killed"
    killed = time.monotonic()
    subprocess.run(["bash", CLUSTER, "crash", H2], env=cluster, check=True, capture_output=True, timeout=60)
    rc, out = finish(hosts[0], 120)
    took = time.monotonic() - killed
    hosts[1].wait(timeout=60)
    assert rc != 0 and took < 20 + 30, (took, out[-3000:])  # within parallel.timeout_s, not a hang
    (line,) = error_lines(out)
    assert f"lost its peer {H2} (10.77.0.2:" in line and "resume" in line, line
    assert "(exitcode: 69)" in out, out[-2000:]
    # the relaunch on both hosts resumes from the last complete checkpoint and ends as one process does
    outs = [finish(p) for p in torchrun_both(cluster, args, 29525)]
    for rc, out in outs:
        assert rc == 0, out[-3000:]
    assert re.search(rf"resumed from {run}/step-(4|5|6|7)", outs[0][1]), outs[0][1][-2000:]
    same_run(reference(8), run, 8)


def test_a_peer_that_cannot_be_reached_stops_every_host_in_bounded_time_with_one_line(cluster, micro_model,
                                                                                        data_dir, tmp_path):
    """GLOO_SOCKET_IFNAME=lo on every host (a wrong hint): each advertises loopback to the other."""
    args = overrides(tmp_path / "run", micro_model, data_dir, **{"parallel.timeout_s": 10})
    t0 = time.monotonic()
    outs = [finish(p, 120) for p in torchrun_both(cluster, args, 29526, GLOO_SOCKET_IFNAME="lo")]
    took = time.monotonic() - t0
    assert took < 10 + 10 + 40, took  # the timeout, the watchdog's grace, start-up on 2 busy cores
    for rc, out in outs:
        assert rc != 0
        (line,) = error_lines(out)
        assert "could not join its peers" in line and "MASTER_ADDR=10.77.0.1" in line, line
        assert "(exitcode: 69)" in out, out[-2000:]
    # the side that tried to connect names the address it tried
    assert any(re.search(r"127\.0\.0\.1:\d+ \(loopback", error_lines(out)[0]) for _, out in outs), outs
