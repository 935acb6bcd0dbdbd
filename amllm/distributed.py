"""Process-group set-up and the few collectives the trainer needs.

The launch is always a standard launcher: a plain `python train.py` (one process), `torchrun`
(single- or multi-node; it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) or
`deepspeed` (same variables). NCCL on CUDA, gloo on CPU (``parallel.dist_backend`` overrides:
gloo over CUDA tensors lets several ranks share one GPU, which NCCL refuses -- for tests on a
one-GPU machine, not for speed).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int, dist_backend: str = "auto") -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` when CUDA is used. Over gloo, ranks beyond the
    visible GPUs share them round-robin (NCCL refuses two ranks on one GPU, so it stays an error)."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        count = torch.cuda.device_count()
        if local_rank >= count:
            if dist_backend != "gloo":
                raise ConfigError(f"LOCAL_RANK={local_rank} but this host shows {count} CUDA device(s); launch at most "
                                  f"{count} process(es) per host (--nproc_per_node), or set parallel.dist_backend=gloo "
                                  f"to let ranks share a GPU (tests only: slow)")
            local_rank %= count
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _backend_name(dist_backend: str, device: torch.device) -> str:
    """parallel.dist_backend resolved: auto is NCCL on CUDA, gloo on CPU."""
    if dist_backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if dist_backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"parallel.dist_backend=nccl needs CUDA devices, but this run is on {device.type}; "
                          f"use parallel.dist_backend=auto or gloo")
    return dist_backend


def init_distributed(device_pref: str = "auto", deepspeed: bool = False, dist_backend: str = "auto",
                     timeout_s: int = 1800) -> DistInfo:
    """Join the process group the launcher described (or none for a plain process).

    deepspeed: join through `deepspeed.init_distributed` (its communication layer wraps the same
    torch process group; on CPU it also builds its shared-memory op once), even for one process,
    since the engine expects it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank, dist_backend)
    backend = _backend_name(dist_backend, device)
    if deepspeed and not dist.is_initialized():
        try:
            import deepspeed as ds
        except ImportError:
            raise RuntimeError("parallel.backend=deepspeed needs DeepSpeed: pip install 'amllm[deepspeed]'") from None
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # a plain `python train.py` (1 process)
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        ds.init_distributed(dist_backend=backend,
                            timeout=datetime.timedelta(seconds=timeout_s))
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_store(rank, world, timeout)
        dist.init_process_group(backend=backend, timeout=timeout,
                                device_id=device if backend == "nccl" else None,  # eager NCCL init only
                                **({"store": store, "rank": rank, "world_size": world} if store else {}))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def ensure_process_group(device: torch.device) -> None:
    """A one-rank process group when none was started (one process: init_distributed joins none),
    for what needs a group even then (FSDP2's fully_shard). In-process store: no port is taken."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)


def _restart_store(rank: int, world: int, timeout: datetime.timedelta):
    """After a `torchrun --max-restarts` restart: the launcher's store under a per-attempt prefix.

    torchrun keeps ONE TCPStore for all attempts, so a restarted process group would read the dead
    attempt's gloo/NCCL addresses and fail to connect (pytorch/pytorch#135712; seen with torch 2.13
    static and c10d rendezvous). TORCHELASTIC_RESTART_COUNT is the same for all workers of one agent;
    across nodes agents can count restarts differently, so multi-node jobs should restart at the job
    level (the run auto-resumes) rather than rely on --max-restarts. None on a first attempt."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0":
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    return dist.PrefixStore(f"amllm/attempt_{attempt}", store)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over all ranks (a no-op in one process)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_dist():
        dist.barrier()


def main_first(fn, what: str, timeout_s: float, error=RuntimeError, note_every_s: float = 60.0) -> None:
    """Rank 0 runs ``fn()`` while every other rank waits; then all go on, or all raise rank 0's error.

    The wait does not ride on the default group's timeout (NCCL's 30 minutes would kill a long first
    tokenization): it is an asynchronous broadcast on a gloo side group with its own ``timeout_s``,
    polled so that rank 1 prints progress every ``note_every_s``. If ``fn`` raises on rank 0, the other
    ranks raise ``error`` with its one-line message instead of hanging in a barrier."""
    if not is_dist():
        fn()
        return
    rank = dist.get_rank()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s + 60))
    if rank == 0:
        try:
            fn()
        except BaseException as e:
            _send_status(group, f"{type(e).__name__}: {e}".splitlines()[0])
            raise
        _send_status(group, "")
    else:
        message = _wait_status(group, rank, what, timeout_s, note_every_s, error)  # raises on a timeout:
        if message:  # the group is left as is (destroying it would wait for rank 0's pending broadcast)
            raise error(f"rank 0 failed while {what}: {message}")
    dist.destroy_process_group(group)


def _send_status(group, message: str) -> None:
    data = torch.tensor(list(message.encode()), dtype=torch.uint8)
    dist.broadcast(torch.tensor([data.numel()]), src=0, group=group)
    if data.numel():
        dist.broadcast(data, src=0, group=group)


def _wait_status(group, rank: int, what: str, timeout_s: float, note_every_s: float, error) -> str:
    length = torch.zeros(1, dtype=torch.int64)
    work = dist.broadcast(length, src=0, group=group, async_op=True)
    start = time.monotonic()
    note_at = start + note_every_s
    while not work.is_completed():
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise error(f"rank {rank} waited {waited:.0f} s for rank 0 {what} (data.prepare_timeout_s={timeout_s:g}); "
                        f"tokenize ahead with `python -m tools.prepare_data --config ...` or raise the timeout")
        if rank == 1 and time.monotonic() >= note_at:
            print(f"[rank 1] waiting for rank 0 {what}: {waited / 60:.0f} min so far (the other ranks wait too; "
                  f"`python -m tools.prepare_data` does this ahead of a run)", flush=True)
            note_at += note_every_s
        time.sleep(0.1)
    try:
        work.wait()
    except Exception as e:  # rank 0 died, or gloo's own timeout
        raise error(f"rank {rank} lost rank 0 while it was {what}: {str(e).splitlines()[0]}") from None
    if not int(length):
        return ""
    data = torch.empty(int(length), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    return bytes(data.tolist()).decode(errors="replace")


def raise_if_any_rank(failure: BaseException | None, error=RuntimeError, hint: str = "") -> None:
    """Collective: if any rank failed, every rank raises ``error`` with the first failing rank's message
    (instead of the failed rank leaving and the others hanging in their next collective)."""
    if not is_dist():
        if failure is not None:
            raise failure
        return
    msgs = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if failure is None else str(failure).splitlines()[0])
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        r, m = bad[0]
        raise error(f"rank {r}: {m}" + (f" ({hint})" if hint and r != 0 else ""))


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (used for small things: paths, decisions, errors)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks take the same branch)."""
    if not is_dist():
        return flag
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return any(flags)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish(code: int, sync: bool = True) -> int:
    """End a run with exit status `code`: returns it in one process; in a launched multi-process
    run, ends the process here.

    Why not a normal return: when the last reference to a gloo ProcessGroup goes away (e.g. the DDP
    reducer freed as `main` returns), its destructor joins its worker thread while holding the GIL,
    and that thread may be waiting for the GIL to free a tensor of a finished collective -- a
    deadlock seen after torchrun restarts. So every rank meets at a barrier (all files written),
    destroys the group while the model still holds a reference (no destructor runs), flushes, and
    leaves with os._exit, skipping the racing teardown. Nothing is left to do at that point.
    sync=False (an error path, where another rank may not come to the barrier): just leave."""
    if not is_dist():
        cleanup()
        return code
    try:
        if sync:
            dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def is_main_rank() -> bool:
    return not is_dist() or torch.distributed.get_rank() == 0


def say(line: str) -> None:
    """print on rank 0 only."""
    if is_main_rank():
        print(line, flush=True)
