"""Launching: the launchers' command lines (--dry-run), the SLURM pre-emption signal, and the wait of
the other ranks while rank 0 tokenizes (train.py's data section, amllm.distributed.main_first)."""
from __future__ import annotations

import datetime
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.dist_cases import free_port, setup_env

ROOT = Path(__file__).resolve().parent.parent


# ---- rank 0 prepares, the others wait (2 gloo ranks, a default-group timeout of 2 s) ----------------

class FakeDataError(Exception):
    pass


def _prepare_worker(rank: int, world: int, port: int, case: str, q) -> None:
    setup_env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=2))
    from amllm import distributed as D

    def slow_prepare():  # longer than the default group's timeout, which a plain barrier would hit
        time.sleep(4)
        if case == "error":
            raise FakeDataError("data.path='/nowhere' has no c4-train.*.json.gz files; fix data.path")

    t0 = time.monotonic()
    try:
        D.main_first(slow_prepare, "tokenizing the data", timeout_s=1 if case == "timeout" else 60,
                     error=FakeDataError, note_every_s=1)
        out = "ok"
    except FakeDataError as e:
        out = f"error: {e}"
    except Exception as e:  # rank 0 of the timeout case: its peer left
        out = f"other: {type(e).__name__}"
    q.put((rank, out, time.monotonic() - t0))
    if case != "timeout":  # rank 1 left early there; rank 0's sends fail or finish on their own
        dist.destroy_process_group()


def _run_prepare(case: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_prepare_worker, args=(r, 2, port, case, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, res, waited = q.get(timeout=90)
        out[rank] = (res, waited)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return out


def test_other_ranks_outwait_the_default_group_timeout():
    out = _run_prepare("ok")
    assert out[0][0] == out[1][0] == "ok"
    assert out[1][1] > 3.5  # rank 1 really waited longer than the group's 2 s timeout


def test_rank0_prepare_error_reaches_every_rank_as_one_line():
    out = _run_prepare("error")
    assert out[0][0].startswith("error: data.path=")
    assert re.fullmatch(r"error: rank 0 failed while tokenizing the data: FakeDataError: data\.path=.*fix data\.path",
                        out[1][0]), out[1][0]


def test_waiting_ranks_stop_after_the_prepare_timeout_with_the_fix():
    res, waited = _run_prepare("timeout")[1]
    assert "waited" in res and "data.prepare_timeout_s=1" in res and "python -m tools.prepare_data" in res, res
    assert waited < 3.5


# ---- launchers --------------------------------------------------------------------------------------

def _dry(script: str, *args, env=None) -> list[str]:
    import os

    r = subprocess.run(["bash", f"launch/{script}", "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def test_slurm_signal_reaches_the_job_steps_not_only_the_batch_shell():
    lines = (ROOT / "launch" / "slurm.sbatch").read_text().splitlines()
    signal = [line for line in lines if line.startswith("#SBATCH --signal")]
    assert len(signal) == 1
    m = re.fullmatch(r"#SBATCH --signal=TERM@(\d+)\b.*", signal[0])
    assert m, signal[0]  # no "B:" (that signals only the batch shell, never train.py)
    assert int(m.group(1)) >= 300  # a 1B checkpoint, see the comment in the file


def test_slurm_dry_run_starts_train_py_once_per_task_and_requeues_on_75():
    out = _dry("slurm.sbatch", "--config", "configs/c4/llama_20m.yaml", "optim.lr=2e-3")
    srun = [line for line in out if line.startswith("srun ")]
    assert len(srun) == 1 and "train.py" in srun[0] and "torchrun" not in srun[0], out
    assert "--config configs/c4/llama_20m.yaml optim.lr=2e-3" in srun[0]
    assert any("scontrol requeue" in line for line in out), out


def test_torchrun_multinode_defaults_to_no_restarts():
    out = _dry("torchrun_multinode.sh", "--config", "CFG", env={"NNODES": "2", "NODE_RANK": "1",
                                                              "NPROC_PER_NODE": "2"})
    (cmd,) = [line for line in out if line.startswith("torchrun ")]
    assert "--max_restarts 0" in cmd and "--nnodes 2 --node_rank 1 --nproc_per_node 2" in cmd
    assert cmd.endswith("train.py --config CFG")
    assert any(line.startswith("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=") for line in out), out


def test_deepspeed_multinode_dry_run():
    out = _dry("deepspeed_multinode.sh", "--config", "CFG", env={"NUM_GPUS": "2"})
    (cmd,) = [line for line in out if line.startswith("deepspeed ")]
    assert "--num_gpus 2" in cmd and cmd.endswith("parallel.backend=deepspeed "
                                                  "parallel.deepspeed_config=configs/deepspeed/zero2_bf16.json")


def test_deepspeed_hostfile_activates_the_virtualenv_and_carries_the_environment_to_every_host(tmp_path):
    """DeepSpeed's pdsh runner forwards only PYTHON*/NCCL*: the rest must be in its DS_ENV_FILE, and the
    remote shell must activate the virtualenv (tests/test_multinode.py checks it across real hosts)."""
    import sys

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("h1 slots=1\nh2 slots=1\n")
    out = _dry("deepspeed_multinode.sh", "--config", "CFG", env={"HOSTFILE": str(hostfile), "VENV": sys.prefix,
                                                             "HF_HOME": "hf", "OMP_NUM_THREADS": "1"})
    (cmd,) = [line for line in out if line.startswith("deepspeed ")]
    assert f"--venv_script {sys.prefix}/bin/activate" in cmd and "--master_addr h1" in cmd, cmd
    (carried,) = [line for line in out if line.startswith("carried to every host: ")]
    assert {"HF_HOME", "OMP_NUM_THREADS"} <= set(carried.split(": ")[1].split()), carried


@pytest.mark.parametrize("script,env,msg", [
    ("torchrun_multinode.sh", {"NNODES": "two"}, "NNODES=two"),
    ("torchrun_multinode.sh", {"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2"),
    ("deepspeed_multinode.sh", {"HOSTFILE": "no/such/hostfile"}, "HOSTFILE=no/such/hostfile"),
])
def test_launcher_input_errors_are_one_line(script, env, msg):
    import os

    r = subprocess.run(["bash", f"launch/{script}", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "NPROC_PER_NODE": "1", "NUM_GPUS": "1", **env})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr


def test_fsdp2_in_one_process_gets_a_one_rank_group():
    """`python train.py parallel.backend=fsdp2` (or torchrun with 1 process) joins no process group, and
    fully_shard needs one: FSDP2Backend.setup starts a one-rank group (in-process store, no port)."""
    code = """
import torch
from amllm.distributed import ensure_process_group
from amllm.parallel.fsdp import apply_fsdp2
from amllm.optim import AMAdamW
from tests.dist_cases import tiny_llama, global_batch
ensure_process_group(torch.device("cpu"))
model = apply_fsdp2(tiny_llama(), "fp32")
opt = AMAdamW(model.parameters(), lr=1e-2, foreach=True)
ids = global_batch(0)
model(input_ids=ids, labels=ids).loss.backward()
opt.step()
print("ok", float(opt.last_beta))
"""
    import sys

    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_gloo_interface_is_the_one_that_routes_to_master_addr_unless_the_user_set_it(monkeypatch):
    """What train.py does before joining (the cross-host case is tests/test_multinode.py's)."""
    import os

    from amllm import distributed as D

    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "CROSS_SIZE",
                "SLURM_JOB_NUM_NODES", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.setenv(var, "x")  # recorded, so what the call sets is undone after the test
        monkeypatch.delenv(var)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert D.choose_socket_ifname(2, 0) == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    assert D.choose_socket_ifname(2, 0) == "ib0"  # the user's choice stands


def test_a_lost_peer_is_named_from_the_backend_message():
    from amllm import distributed as D

    msg = "[/x/gloo/pair.cc:534] Connection closed by peer [10.77.0.2]:10900. This is typically caused by ..."
    assert D._short(msg.splitlines()[0]) == "Connection closed by peer [10.77.0.2]:10900"
    assert D._peer(msg).endswith("10.77.0.2:10900") or D._peer(msg).endswith("(10.77.0.2:10900)")
    assert "loopback" in D._peer("remote=[127.0.0.1]:28580")
