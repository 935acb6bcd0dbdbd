"""Host syncs: counted on any device, refused on quiet steps with ``train.sync_debug``.

:class:`HostReads` is the CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``. On a GPU,
every call that waits for the device stalls the CPU until the GPU queue drains. On the CPU there is no
queue, but the same calls happen in the same places, so counting them here proves what a GPU run would
do. Counted, one class each (every class CUDA's error mode refuses):

| class                | what is seen                                                                      |
|----------------------|-----------------------------------------------------------------------------------|
| ``read``             | ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``float()``, ``int()``), ``aten.equal`` |
| ``tolist``/``numpy`` | ``Tensor.tolist`` / ``Tensor.numpy`` (they read memory below the dispatcher: wrapped) |
| ``device->host``     | a copy from a non-CPU tensor into a CPU one (``.cpu()``, ``.to("cpu")``)           |
| ``host->device``     | a blocking copy from a CPU tensor to another device (``non_blocking=False``)       |
| ``synchronize``      | ``torch.cuda.synchronize``, ``Stream/Event.synchronize``, ``torch.accelerator.synchronize``, DeepSpeed's ``get_accelerator().synchronize`` |
| ``cuda-sync op``     | ops whose output size depends on the data, so CUDA must wait for it: ``nonzero`` (``torch.where(c)``), ``masked_select``, boolean-mask indexing and assignment, ``bincount``, ``unique*``, ``repeat_interleave`` without ``output_size`` |

On a CPU-only run the two copy classes cannot occur (there is one device); a test plants them with the
``meta`` device. Each hit records the innermost frame outside torch, so a failure says where.

DeepSpeed's own syncs (frames inside the ``deepspeed`` package: ``torch.cuda.synchronize`` every step with
``overlap_comm``, event synchronisations and ``.item()`` under CPU offload) are outside our control: they
are not refused but counted in :data:`DEEPSPEED_SYNCS` (class and place), which the run reports at its
end (docs/parallel.md lists them per DeepSpeed config; python -m tools.bench_ds_syncs measures them).

:func:`no_host_reads` is what ``train.sync_debug=true`` wraps around a training step that neither logs,
evaluates, saves nor checks its flags: on CUDA torch's own sync debug mode (the real thing: "error", or
"warn" with every warning from outside DeepSpeed turned into an error when DeepSpeed is in use), elsewhere
a strict :class:`HostReads`. With ``AMLLM_SYNC_DEBUG=count`` in the environment nothing is refused: our
syncs are counted in :data:`OUR_SYNCS` beside DeepSpeed's and both are reported at the end of the run
(tools/bench_ds_syncs.py uses it on the CPU, where the C++ kernels' reads of CPU tensors are no syncs).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READ_OPS = {aten._local_scalar_dense.default, aten.equal.default}
_COPY_OPS = {aten._to_copy.default, aten.copy_.default}
#: ops that synchronise on CUDA only: their output size is a device value
_CUDA_SYNC_OPS = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten._unique.default,
                  aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                  aten.unique_dim_consecutive.default, aten.argwhere.default}
_BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}

_host_side = 0  # depth of host_side() blocks


@contextlib.contextmanager
def host_side():
    """A block that computes on host tensors by construction (the Triton kernels' pointer tables): on a GPU
    its data-dependent-size ops (``bincount``, ...) run on CPU tensors and wait for nothing. On the CPU
    stand-in every tensor is a CPU tensor, so inside such a block that class is not counted; reads,
    copies and synchronisations still are."""
    global _host_side
    _host_side += 1
    try:
        yield
    finally:
        _host_side -= 1


#: DeepSpeed's own syncs seen in quiet steps, by "class at place" (not refused; reported at the end of a run)
DEEPSPEED_SYNCS: collections.Counter = collections.Counter()
#: ours, by "class at place", under AMLLM_SYNC_DEBUG=count (else the first one raises)
OUR_SYNCS: collections.Counter = collections.Counter()


def _counting_only() -> bool:
    return os.environ.get("AMLLM_SYNC_DEBUG", "error") == "count"


def _frames():
    """The innermost frame outside torch and this module, and the innermost of ours."""
    outer = ours = None
    for frame in reversed(traceback.extract_stack()[:-3]):
        f = frame.filename
        if f.endswith("amllm/debug.py") or "/torch/" in f or "/contextlib.py" in f or "/warnings.py" in f:
            continue
        outer = outer or frame
        if "/amllm/" in f or f.endswith("train.py") or "/tests/" in f:
            ours = frame
            break
    return outer, ours


def _short(frame) -> str:
    return f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno} {frame.name}"


def _in_deepspeed(filename: str) -> bool:
    return "/deepspeed/" in filename.replace("\\", "/")


def _copy_class(func, args, kwargs) -> str | None:
    """'device->host', 'host->device' (blocking) or None for a copy op."""
    if func is aten._to_copy.default:
        src, dst, blocking = args[0], kwargs.get("device"), not kwargs.get("non_blocking", False)
        if not isinstance(src, torch.Tensor) or dst is None:
            return None
        src_type, dst_type = src.device.type, torch.device(dst).type
    else:  # copy_(dst, src, non_blocking=False)
        dst, src = args[0], args[1]
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        if not isinstance(src, torch.Tensor):
            return None
        src_type, dst_type = src.device.type, dst.device.type
    if src_type != "cpu" and dst_type == "cpu":
        return "device->host"
    if src_type == "cpu" and dst_type != "cpu" and blocking:
        return "host->device"
    return None


def _sync_op_class(func, args, kwargs) -> str | None:
    if func in _CUDA_SYNC_OPS:
        return f"cuda-sync op {func}"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return f"cuda-sync op {func}"
    if func in _BOOL_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return f"cuda-sync op {func} (boolean mask)"
    return None


class HostReadError(RuntimeError):
    """A host sync inside a step that must have none (``train.sync_debug``)."""


class HostReads(TorchDispatchMode):
    """Context manager counting host syncs (see the module docstring). ``strict=True``: raise
    :class:`HostReadError` at the first one that is not DeepSpeed's own."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict
        self.count = 0
        self.where: list[str] = []
        self.deepspeed: list[str] = []  # DeepSpeed's own (also added to DEEPSPEED_SYNCS)

    def _hit(self, what: str) -> None:
        outer, ours = _frames()
        where = "?" if outer is None else _short(outer) if ours is None or ours is outer else \
            f"{_short(outer)} (from {_short(ours)})"
        if outer is not None and _in_deepspeed(outer.filename):
            self.deepspeed.append(f"{what} at {where}")
            DEEPSPEED_SYNCS[f"{what} at {_short(outer)}"] += 1
            return
        self.count += 1
        self.where.append(f"{what} at {where}")
        if self.strict and _counting_only():
            OUR_SYNCS[f"{what} at {where}"] += 1
            return
        if self.strict:
            raise HostReadError(f"host sync in a step that must have none: {self.where[-1]} "
                                f"(train.sync_debug=true; see docs/parallel.md)")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READ_OPS:
            self._hit(f"read {func}")
        elif func in _COPY_OPS and (kind := _copy_class(func, args, kwargs)):
            self._hit(f"{kind} copy {func}")
        elif not _host_side and (kind := _sync_op_class(func, args, kwargs)):
            self._hit(kind)
        return func(*args, **kwargs)

    def _patches(self) -> list[tuple[object, str]]:
        """(owner, attribute) of the Python-level calls that read memory or wait for the device."""
        out = [(torch.Tensor, "tolist"), (torch.Tensor, "numpy"), (torch.cuda, "synchronize"),
               (torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize")]
        if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "synchronize"):
            out.append((torch.accelerator, "synchronize"))
        if "deepspeed.accelerator" in sys.modules:  # its synchronize() is the accelerator's (a no-op on CPU)
            from deepspeed.accelerator import get_accelerator

            out.append((type(get_accelerator()), "synchronize"))
        return out

    def __enter__(self):
        self._saved = []
        for owner, name in self._patches():
            real = getattr(owner, name)
            self._saved.append((owner, name, real))
            setattr(owner, name, self._counting(name, real, syncs=name == "synchronize"))
        return super().__enter__()

    def _counting(self, name, real, syncs: bool):
        mode = self

        def counted(*a, **k):
            mode._hit(f"{'synchronize' if syncs else name} ({getattr(real, '__qualname__', name)})")
            if syncs and not torch.cuda.is_available() and real.__module__.startswith("torch.cuda"):
                return None  # the stand-in on a machine without CUDA: counted, nothing to wait for
            return real(*a, **k)

        return counted

    def __exit__(self, *exc):
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        return super().__exit__(*exc)


@contextlib.contextmanager
def _cuda_sync_debug():
    """torch's sync debug mode on CUDA: "error" semantics for our code; DeepSpeed's own syncs counted.
    Runs in "warn" mode and turns every sync warning whose Python caller is not in DeepSpeed into an error
    (raised at the end of the step, with where it came from)."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    ours: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    for w in caught:
        if "synchronizing" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # not ours to swallow
            continue
        place = f"{'/'.join(str(w.filename).split('/')[-2:])}:{w.lineno}"
        if _in_deepspeed(str(w.filename)):
            DEEPSPEED_SYNCS[f"cuda sync at {place}"] += 1
        else:
            ours.append(place)
    if ours and _counting_only():
        OUR_SYNCS.update(f"cuda sync at {place}" for place in ours)
    elif ours:
        raise HostReadError(f"host sync in a step that must have none: CUDA sync at {ours[0]} "
                            f"({len(ours)} in all; train.sync_debug=true; see docs/parallel.md)")


@contextlib.contextmanager
def no_host_reads(device: torch.device, enabled: bool = True):
    """Refuse host syncs inside the block (see the module docstring)."""
    if not enabled:
        yield
        return
    if device.type == "cuda":
        with _cuda_sync_debug():
            yield
        return
    with HostReads(strict=True):
        yield


def sync_report() -> str | None:
    """One line about DeepSpeed's own syncs seen in quiet steps (None when there were none)."""
    lines = []
    for counter, whose in ((DEEPSPEED_SYNCS, "DeepSpeed's own host syncs in quiet steps (not ours; docs/parallel.md)"),
                           (OUR_SYNCS, "our host syncs in quiet steps (AMLLM_SYNC_DEBUG=count)")):
        if counter:
            top = ", ".join(f"{n}x {where}" for where, n in counter.most_common(4))
            lines.append(f"sync_debug: {whose}: {sum(counter.values())} -- {top}")
    return "\n".join(lines) or None
