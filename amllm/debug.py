"""Host reads of device values: counted on any device, refused on unlogged steps with ``train.sync_debug``.

:class:`HostReads` is the CPU stand-in for ``torch.cuda.set_sync_debug_mode``.

On a GPU every read of a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``, a copy to
the host) stalls the CPU until the GPU queue drains. On CPU there is no queue, but the same calls
still happen in the same places, so counting them here proves what a GPU run would do:

    with HostReads() as reads:
        train_steps()
    assert reads.count == 0, reads.where

Counted: ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``float()``, ``int()`` of a tensor,
seen through a ``TorchDispatchMode``), ``Tensor.tolist`` and ``Tensor.numpy`` (they read memory
directly, below the dispatcher, so they are wrapped), and copies whose source is not on the CPU and
whose destination is (``.cpu()``, ``.to("cpu", non_blocking=True)``; only possible on a GPU). Each
hit records the innermost ``amllm``/``train.py``/test frame, so a failure says where.

:func:`no_host_reads` is what ``train.sync_debug=true`` wraps around a training step that neither logs,
evaluates, saves nor checks its flags: on CUDA torch's own sync debug mode set to "error" (the real
thing: any synchronising call raises), elsewhere a :class:`HostReads` that raises at the first read.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READ_OPS = {torch.ops.aten._local_scalar_dense.default}
_COPY_OPS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _where() -> str:
    """The innermost frame outside torch (e.g. inside DeepSpeed), and the innermost of ours."""
    def short(frame):
        return f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno} {frame.name}"

    outer = ours = None
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if f.endswith("amllm/debug.py") or "/torch/" in f or "/contextlib.py" in f:
            continue
        outer = outer or frame
        if "/amllm/" in f or f.endswith("train.py") or "/tests/" in f:
            ours = frame
            break
    if outer is None:
        return "?"
    return short(outer) if ours is None or ours is outer else f"{short(outer)} (from {short(ours)})"


def _to_host(func, args, kwargs) -> bool:
    if func is torch.ops.aten._to_copy.default:
        src, dst = args[0], kwargs.get("device")
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None and \
            torch.device(dst).type == "cpu"
    if func is torch.ops.aten.copy_.default:
        dst, src = args[0], args[1]
        return src.device.type != "cpu" and dst.device.type == "cpu"
    return False


class HostReadError(RuntimeError):
    """A host read of a tensor value inside a step that must have none (``train.sync_debug``)."""


class HostReads(TorchDispatchMode):
    """Context manager counting host reads of tensor values (see the module docstring).
    ``strict=True``: raise :class:`HostReadError` at the first one instead."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict
        self.count = 0
        self.where: list[str] = []

    def _hit(self, what: str) -> None:
        self.count += 1
        self.where.append(f"{what} at {_where()}")
        if self.strict:
            raise HostReadError(f"host read of a tensor value in a step that must have none: {self.where[-1]} "
                                f"(train.sync_debug=true; see docs/parallel.md)")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READ_OPS:
            self._hit(str(func))
        elif func in _COPY_OPS and _to_host(func, args, kwargs):
            self._hit(f"{func} to the host")
        return func(*args, **kwargs)

    def __enter__(self):
        self._orig = (torch.Tensor.tolist, torch.Tensor.numpy)
        mode = self
        orig_tolist, orig_numpy = self._orig

        def tolist(t, *a, **k):
            mode._hit("Tensor.tolist")
            return orig_tolist(t, *a, **k)

        def numpy(t, *a, **k):
            mode._hit("Tensor.numpy")
            return orig_numpy(t, *a, **k)

        torch.Tensor.tolist, torch.Tensor.numpy = tolist, numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._orig
        return super().__exit__(*exc)


@contextlib.contextmanager
def no_host_reads(device: torch.device, enabled: bool = True):
    """Refuse host reads of device values inside the block (see the module docstring)."""
    if not enabled:
        yield
        return
    if device.type == "cuda":
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        return
    with HostReads(strict=True):
        yield
