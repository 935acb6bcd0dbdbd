"""Non-finite losses and gradients: caught on the device, acted on at checks; never saved.

docs/faults.md lists every failure, what it costs and which test shows it.
"""

from __future__ import annotations

import torch

from . import distributed as D
from .distributed import say


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm with train.nonfinite=stop (one line, names the step)."""


class NonFiniteGuard:
    """Non-finite steps and stop requests, decided on the device and read on the host only at checks.

    Per step (:meth:`observe`, no host read): this rank's flags -- non-finite loss, non-finite gradient
    norm, a stop request (SIGTERM/SIGINT) -- are packed into one tensor and MAX-reduced once over all
    ranks: the one collective of a step's bookkeeping. Their OR, ``found_inf``, goes to the optimizer
    (the GradScaler protocol: ``optimizer.found_inf``), which skips its whole update on the device; the
    AM optimizers also skip when their all-reduced statistics are non-finite (``skip_nonfinite``: a NaN
    gradient on any rank, also under DeepSpeed, where the norm is only known inside the engine).
    :meth:`record` folds what happened into device accumulators (skipped steps since the last check,
    the first bad step and why, the agreed stop request).

    At a check (:meth:`check`: logged, evaluated and saved steps, and every ``train.check_every``
    steps; every rank at the same steps) one host read of the accumulators: skip mode prints what was
    skipped, stop mode raises :class:`NonFiniteError` naming the first bad step, and
    ``stop_requested`` becomes the agreed stop request. Guarantees: with an optimizer that takes
    ``found_inf`` (AM-AdamW / AM-SGD, torch's fused AdamW/SGD) a non-finite step never reaches the
    weights in either mode; with any optimizer nothing non-finite reaches a checkpoint (a save is
    always preceded by a check, and checks the state itself); a stop request or a non-finite step is
    acted on within ``check_every`` steps. Optimizers without ``found_inf`` under skip mode cost one
    host read per step (see :meth:`needs_host_decision`).
    """

    def __init__(self, mode: str, device: torch.device, skipped: int = 0, first_step: int = 0):
        self.mode, self.device, self.skipped = mode, device, int(skipped)
        self.stop_requested = False
        self._first_step = first_step  # step numbers on the device count from here (no host->device copy)
        self._const = torch.tensor([0.0, 1.0], device=device)  # the stop flag picks one: no copy per step
        self._n = torch.zeros((), device=device)  # steps observed
        # skipped since the last check, first bad step (0: none), its loss flag, its gradient flag, stop
        self._acc = torch.zeros(5, device=device)

    def observe(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None, stop: bool = False) -> torch.Tensor:
        """One step's flags, agreed by all ranks; returns ``flags`` = [loss bad, grad bad, stop] (device)."""
        norm_bad = (self._const[0] if grad_norm is None else
                    (~torch.isfinite(grad_norm.detach().float())).float().to(self.device))
        flags = torch.stack([(~torch.isfinite(loss_sum.detach().float())).float(), norm_bad,
                             self._const[1 if stop else 0]])
        if D.is_dist():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        self._n.add_(1)
        return flags

    @staticmethod
    def found_inf(flags: torch.Tensor) -> torch.Tensor:
        """0-d float: 1.0 when the step must not be applied."""
        return flags[:2].amax()

    def needs_host_decision(self, optimizer) -> bool:
        """Skip mode with an optimizer that cannot skip on the device: the step is decided on the host."""
        return self.mode == "skip" and not takes_found_inf(optimizer)

    def record(self, flags: torch.Tensor, skipped: torch.Tensor) -> None:
        """Fold a step into the accumulators. ``skipped``: 0-d, whether the update was skipped (it can
        be set with finite flags: an AM optimizer saw non-finite statistics, i.e. a bad gradient)."""
        skipped = skipped.detach().float().to(self.device)
        bad = torch.maximum(self.found_inf(flags), skipped)
        first = (self._acc[1] == 0) & (bad > 0)
        grad_bad = torch.maximum(flags[1], skipped * (flags[0] == 0))  # a skip not caused by the loss
        now = torch.stack([self._acc[0] + skipped, self._n + self._first_step, flags[0], grad_bad,
                           torch.maximum(self._acc[4], flags[2])])
        keep = torch.stack([now[0], self._acc[1], self._acc[2], self._acc[3], now[4]])
        self._acc.copy_(torch.where(torch.stack([self._const[1] > 0, first, first, first, self._const[1] > 0]),
                                    now, keep))

    def check(self, step: int) -> None:
        """The host read: act on what the device saw since the last check (see the class docstring)."""
        n_skipped, first, loss_bad, grad_bad, stop = self._acc.tolist()
        self._acc[:4].zero_()
        self.stop_requested = bool(stop)
        if not first:
            return
        what = " and ".join(w for w, b in (("loss", loss_bad), ("gradient norm", grad_bad)) if b) or "gradient norm"
        first = int(first)
        if self.mode == "stop":
            raise NonFiniteError(f"step {first}: non-finite {what}; stopped without saving (train.nonfinite=stop), "
                                 f"the last checkpoint is intact; lower optim.lr, or resume with "
                                 f"train.nonfinite=skip to skip such batches")
        n = int(n_skipped)
        self.skipped += n
        more = f", and {n - 1} more up to step {step}" if n > 1 else ""
        say(f"warning: step {first}: non-finite {what}; update skipped ({self.skipped} so far{more})")


def takes_found_inf(optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``optimizer.found_inf`` on the device: the AM optimizers
    (``skip_nonfinite`` protocol) and torch's fused optimizers (the ones GradScaler drives that way)."""
    return hasattr(optimizer, "last_skipped") or bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def check_finite_state(state: dict, what: str, step: int) -> None:
    """Refuse to save a state dict holding NaN/inf (a checkpoint must never carry them)."""
    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                raise NonFiniteError(f"refusing to save step-{step}: {what} {name} holds non-finite values; "
                                     f"the last checkpoint is intact (see train.nonfinite)")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")
    walk(state, "")
