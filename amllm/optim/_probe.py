"""Deciding once per key whether an optional kernel path runs here (compiled, Triton).

A path that cannot be built (no compiler, no Triton backend, a driver or interpreter
problem) must not fail a training run: the reason is recorded, one warning is issued,
and the caller takes the foreach path from then on.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional


def check_once(status: dict, key, what: str, where: str, check: Callable[[], Optional[str]], warn: bool = True) -> bool:
    """``check()`` returns None (usable) or a reason; an exception is a reason too."""
    if key not in status:
        try:
            reason = check()
        except Exception as e:  # see the module docstring
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        status[key] = True if reason is None else reason
        if reason is not None and warn:
            warnings.warn(f"amllm.optim: {what} unavailable on {where} ({reason}); using the foreach path",
                          RuntimeWarning, stacklevel=4)
    return status[key] is True
