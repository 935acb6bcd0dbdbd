"""The fused CPU kernels of AM-AdamW and AM-SGD (``csrc/am_cpu.cpp``), built on first use.

``fused=True`` (and the automatic choice for large models) runs these on CPU tensors:
one C++ call per pass for every tensor of a (dtype) bucket, parallel over chunks on
torch's intra-op threads, sums kept in registers. On the LLaMA-20M shapes they bring
AM-AdamW's step under 2x torch's fused AdamW on a 2-core CPU, where the torch.compile'd
kernels (``_compiled.py``) took 3x: Inductor's CPU reductions
spill a cascade-summation stack to memory, and each per-tensor compiled call costs
~50 us of Python (see docs/optimizer.md for the measurements).

Build: ``torch.utils.cpp_extension.load`` (g++ with OpenMP and ninja, ~25 s once;
cached under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). The
extension name carries the CPU capability torch detected (the vector flags match it) and
the torch version, so a cache shared by nodes with different CPUs, or by virtualenvs with
different torch releases, never loads code built for another instruction set or ABI.

Concurrent builders (the ranks of a run, two hosts on a shared home, two test jobs) are
serialised by an ``flock`` next to the build folder, which the kernel releases when its
holder dies. torch's own lock is a plain file (``<build>/lock``) that a build killed
mid-way (SIGKILL, a timeout) leaves behind, and every later process would wait on it
forever; holding the flock, we know no live amllm process is building, so such a file is
stale and is removed with a warning. Where the build fails (no
compiler, no ninja, an exotic platform) one warning is issued and callers fall back to
the compiled or foreach path. ``AMLLM_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

_SRC = Path(__file__).resolve().parent / "csrc" / "am_cpu.cpp"
_VERSION = 2  # bump when the source changes (the name keys the build cache). 2: v written in pass 2, skip flag
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_ext = None
_status: Optional[str] = None  # None: not tried; "ok"; else the reason it is unavailable

# Vector flags per torch CPU capability (what Inductor passes for the same capability).
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "DEFAULT"


def _announce_build(name: str) -> None:
    """One line on stderr when nothing is built yet, so the first step's pause is explained."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private; only for this notice

        folder = Path(_get_build_directory(name, verbose=False))
        if not any(folder.glob("*.so")):
            print(f"amllm.optim: building the fused CPU optimizer kernels (once per machine, ~25 s) in {folder}",
                  file=sys.stderr, flush=True)
    except Exception:  # the notice is a courtesy; the build itself reports real problems
        pass


@contextlib.contextmanager
def _build_lock(name: str):
    """Hold an ``flock`` beside the build folder of ``name``; inside it, drop a stale torch lock."""
    try:
        import fcntl

        from torch.utils.cpp_extension import _get_build_directory  # private; where torch builds `name`

        folder = Path(_get_build_directory(name, verbose=False))
        handle = open(folder.parent / f"{name}.amllm-lock", "a+")
    except Exception:  # no fcntl (Windows), unwritable cache: torch's own lock alone, as before
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process dies
        stale = folder / "lock"
        if stale.exists():
            warnings.warn(f"amllm.optim: removing {stale}, left by a build that was killed; building again",
                          RuntimeWarning, stacklevel=4)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reason(e: Exception) -> str:
    """One line for a failed build: the compiler's first ``error:`` line if there is one
    (torch's message starts with ninja's long command line), else the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln and not ln.startswith("[")]
    return f"{type(e).__name__}: {(errors or lines or [''])[0][:300]}"


def load():
    """The extension module, building it on first use; None (after one warning) if that fails."""
    global _ext, _status
    if _status is None:
        if os.environ.get("AMLLM_CPU_KERNELS", "1") == "0":
            _status = "disabled by AMLLM_CPU_KERNELS=0"
            return None
        cap = _capability()
        tag = re.sub(r"[^a-z0-9]+", "_", f"{cap}_torch{torch.__version__}".lower())  # e.g. "NO AVX", "2.11.0+cu130"
        name = f"amllm_am_cpu_v{_VERSION}_{tag}"
        try:
            from torch.utils.cpp_extension import load as _load

            with _build_lock(name):
                _announce_build(name)
                _ext = _load(
                    name=name,
                    sources=[str(_SRC)],
                    extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", *_ARCH_FLAGS.get(cap, [])],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            _status = "ok"
        except Exception as e:  # no compiler / ninja / headers: the other paths still work
            _status = _reason(e)
            warnings.warn(f"amllm.optim: the fused CPU kernels could not be built ({_status}); using the "
                          f"compiled or foreach path (set AMLLM_CPU_KERNELS=0 to skip the build)",
                          RuntimeWarning, stacklevel=3)
    return _ext


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels serve tensors of this device and dtype (builds on first call)."""
    return device.type == "cpu" and dtype in _DTYPES and load() is not None
