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
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError

PEER_EXIT = 69  # EX_UNAVAILABLE: a peer could not be reached, or was lost; relaunch (the run resumes)


class PeerError(RuntimeError):
    """A rank could not join its peers, or lost one: one line naming the host and address involved."""


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
    if world > 1:
        choose_socket_ifname(world, local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if world > 1 and not dist.is_initialized():
        # joined here for DeepSpeed too, so the join alone is under the watchdog: DeepSpeed's own init
        # then wraps this group, and JIT-builds its CPU op (a minute, once) outside the bounded join
        def join():
            store = _restart_store(rank, world, timeout)
            dist.init_process_group(backend=backend, timeout=timeout,
                                    device_id=device if backend == "nccl" else None,  # eager NCCL init only
                                    **({"store": store, "rank": rank, "world_size": world} if store else {}))
        _join(join, rank, world, timeout_s)
    if deepspeed:
        try:
            import deepspeed as ds
        except ImportError:
            raise RuntimeError("parallel.backend=deepspeed needs DeepSpeed: pip install 'amllm[deepspeed]'") from None
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # a plain `python train.py` (1 process)
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        ds.init_distributed(dist_backend=backend, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


# ---- joining across hosts: the interface, a bounded join, one line when a peer is unreachable or lost -----

_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def choose_socket_ifname(world: int, local_rank: int) -> str | None:
    """Set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (each only where the user did not) to the interface
    that routes to MASTER_ADDR, and return it (None: left to the backends).

    Why: without a hint gloo binds the address this host's name resolves to, which is 127.0.1.1 on
    Debian and on many clusters; the other hosts then connect to loopback and fail, and this host waits
    for them until its timeout. When MASTER_ADDR is this very host and resolves to loopback here, the
    job still spans hosts, so the interface of the default route (else the first interface with a
    global address) is the one the other hosts reach us by."""
    user = {v: os.environ[v] for v in _IFNAME_VARS if os.environ.get(v)}
    name = user.get("GLOO_SOCKET_IFNAME")
    ifaces = _interface_addresses()
    if len(user) < len(_IFNAME_VARS):
        addr = _resolve(os.environ.get("MASTER_ADDR", "127.0.0.1"))
        local = _source_address(addr) if addr else ""  # unresolvable: the backend's own error names it
        name = next((n for n, a in ifaces.items() if a == local), None) if local else None
        if local and (name is None or (local.startswith("127.") and _spans_hosts(world))):
            route = _default_route_interface()
            name = route if route in ifaces else next((n for n, a in ifaces.items() if not a.startswith("127.")), name)
        for var in _IFNAME_VARS:
            if name:
                os.environ.setdefault(var, name)
    if local_rank == 0 and _spans_hosts(world) and os.environ.get("GLOO_SOCKET_IFNAME"):
        gloo = os.environ["GLOO_SOCKET_IFNAME"]
        why = ("GLOO_SOCKET_IFNAME as set" if "GLOO_SOCKET_IFNAME" in user else
               f"the interface that routes to MASTER_ADDR={os.environ.get('MASTER_ADDR')}; GLOO_SOCKET_IFNAME / "
               f"NCCL_SOCKET_IFNAME override it")
        print(f"[dist] {socket.gethostname()}: gloo over {gloo} ({ifaces.get(gloo, 'no IPv4 address')}), {why}",
              flush=True)
    return name


def _spans_hosts(world: int) -> bool:
    """Does the job run on more than this host? From what torchrun, deepspeed and SLURM set."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
    nodes = max(int(os.environ.get(v, "1") or 1) for v in ("GROUP_WORLD_SIZE", "CROSS_SIZE", "SLURM_JOB_NUM_NODES"))
    return nodes > 1 or (local is not None and local.isdigit() and int(local) < world)


def _resolve(host: str) -> str | None:
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except (OSError, IndexError):
        return None


def _source_address(addr: str) -> str:
    """This host's address for packets to ``addr`` (a UDP connect sends nothing; the kernel picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))
            return s.getsockname()[0]
        except OSError:
            return ""


def _interface_addresses() -> dict[str, str]:
    """{interface: IPv4 address} of the interfaces that have one (Linux ioctl; {} elsewhere)."""
    try:
        import fcntl
        import struct
    except ImportError:
        return {}
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                out[name] = socket.inet_ntoa(raw[20:24])
            except OSError:
                pass
    return out


def _default_route_interface() -> str | None:
    try:
        from pathlib import Path

        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "00000000":
                return fields[0]
    except OSError:
        pass
    return None


_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)|\(([0-9a-zA-Z.\-:]+), (\d+)\)")


def _where() -> str:
    iface = os.environ.get("GLOO_SOCKET_IFNAME") or "default"
    return (f"MASTER_ADDR={os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}, "
            f"this host {socket.gethostname()} over {iface}")


def _peer(message: str) -> str:
    """The peer a backend error names: 'host (address:port)' from its last [addr]:port or (addr, port)."""
    found = _ADDRESS.findall(message)
    if not found:
        return "a peer"
    a, p, a2, p2 = found[-1]
    addr, port = a or a2, p or p2
    try:
        name = socket.gethostbyaddr(addr)[0]
    except OSError:
        name = ""
    loop = " (loopback: that host's name resolves to loopback; set GLOO_SOCKET_IFNAME on every host)" \
        if addr.startswith("127.") else ""
    return f"{name} ({addr}:{port}{loop})" if name and name != addr else f"{addr}:{port}{loop}"


def _join(fn, rank: int, world: int, timeout_s: float) -> None:
    """Run the process-group join ``fn``; a failure becomes one PeerError line, and a join that hangs past
    parallel.timeout_s (plus a grace for the backend's own, better error) ends this process with PEER_EXIT."""
    done = threading.Event()
    grace = max(10.0, 0.1 * timeout_s)

    def watchdog():
        if not done.wait(timeout_s + grace):
            print(f"error: rank {rank} of {world} could not join its peers within parallel.timeout_s={timeout_s:g} s "
                  f"({_where()}); check that every host was started and reaches MASTER_ADDR", file=sys.stderr,
                  flush=True)
            os._exit(PEER_EXIT)

    threading.Thread(target=watchdog, daemon=True, name="amllm-join-watchdog").start()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- whatever the backend raises while joining is a join failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerError(f"rank {rank} of {world} could not join its peers: {_peer(str(e))} failed ({_short(first)}; "
                        f"{_where()}); every host must reach MASTER_ADDR, and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME "
                        f"(if set) must name the interface that routes to it") from None
    finally:
        done.set()


def _short(line: str) -> str:
    """A backend's message without source locations and past its first sentence (gloo adds advice)."""
    return re.split(r"(?<=\S)\. ", re.sub(r"\[/\S+:\d+\] ", "", line))[0][:200]


_LOST = re.compile(r"Connection closed by peer|Connection reset|Broken pipe|Read error|Write error|timed out|"
                   r"Timed out|NCCL communicator was aborted|DistNetworkError|Socket Timeout", re.IGNORECASE)


def as_peer_error(e: BaseException) -> PeerError | None:
    """A backend error that means a peer was lost during the run, as one PeerError line; None otherwise."""
    if isinstance(e, PeerError):
        return e
    if not isinstance(e, RuntimeError) or not is_dist() or not _LOST.search(str(e)):
        return None
    first = next((line for line in str(e).splitlines() if _LOST.search(line)), str(e).splitlines()[0])
    return PeerError(f"rank {dist.get_rank()} on {socket.gethostname()} lost its peer {_peer(str(e))} ({_short(first.strip())}); "
                     f"the run stopped: relaunch the same command on every host to resume from the last checkpoint")


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
