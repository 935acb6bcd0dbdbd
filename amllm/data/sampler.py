"""Deterministic, resumable, rank-sharded batches from a flat token stream.

Windows. With ``L = seq_len`` the stream is cut into non-overlapping windows
``w_i = tokens[i*L : i*L + L + 1]`` (``x = w[:-1]``, ``y = w[1:]``), ``i < n_windows = (n_tokens-1)//L``.
Neighbouring windows share one token (the last target of one is the first input of the next), so
every token is predicted at most once per epoch.

Order. Epoch ``e`` visits the windows in ``torch.randperm(n_windows)`` drawn from a
``torch.Generator`` seeded with :func:`epoch_seed` (seed, e): a new permutation each epoch, the same on
every machine. The epochs are concatenated into one infinite sequence of window indices.

Batches. Optimizer step ``s`` consumes positions ``[s*B, (s+1)*B)`` of that sequence (``B`` = global
batch). Rank ``r`` of ``W`` takes the contiguous slice ``[r*B/W, (r+1)*B/W)`` and cuts it into
micro-batches of ``m`` sequences. The global batch therefore depends on (seed, step) only: W ranks x
accumulation see exactly the sequences one process sees, and a resumed run, on any world size,
continues with the next unseen batch. The state is one int (``step``) plus checks.

Validation (:func:`val_batches`): the first ``token_budget // L`` windows of the validation stream,
in order, split into contiguous per-rank blocks; every window is evaluated exactly once for any W.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from amllm.data.errors import DataError

STATE_VERSION = 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch.Generator seed of (seed, epoch). Hashed, because torch's CPU generator keeps only the
    low 32 bits of its seed: seed * 2**32 + epoch would give every seed the same order."""
    digest = hashlib.sha256(f"amllm-sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def num_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (int(n_tokens) - 1) // seq_len)


def _windows(tokens: np.ndarray, idx: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 tensors of shape (len(idx), seq_len) for windows `idx`; memmap stays uint16."""
    positions = idx[:, None] * seq_len + np.arange(seq_len + 1)  # (n, L+1)
    w = torch.from_numpy(tokens[positions].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class BatchSampler:
    """Training batches of one rank. ``next_batch()`` returns this rank's micro-batches of the next
    optimizer step: a list of ``B / W / m`` pairs ``(x, y)``, LongTensors of shape ``(m, seq_len)``."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, micro_batch: int,
                 rank: int = 0, world: int = 1, seed: int = 0) -> None:
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"rank {rank} is not in a world of size {world}; check the launcher (torchrun --nproc_per_node)")
        if global_batch % world:
            raise DataError(f"train.batch_size={global_batch} is not divisible by world size {world}; "
                            f"use a multiple of {world} (or run on a world size that divides it)")
        per_rank = global_batch // world
        if micro_batch < 1 or per_rank % micro_batch:
            raise DataError(f"train.micro_batch_size={micro_batch} does not divide the per-rank batch "
                            f"{per_rank} (train.batch_size={global_batch} / world {world}); pick a divisor of {per_rank}")
        if seed < 0:
            raise DataError(f"train.seed={seed} must be >= 0")
        self.tokens, self.seq_len = tokens, int(seq_len)
        self.n_windows = num_windows(len(tokens), self.seq_len)
        if self.n_windows == 0:
            raise DataError(f"the training stream has {len(tokens)} tokens, fewer than data.seq_len+1="
                            f"{self.seq_len + 1}; use more data or a smaller data.seq_len")
        self.global_batch, self.micro_batch = int(global_batch), int(micro_batch)
        self.rank, self.world, self.seed = int(rank), int(world), int(seed)
        self.step = 0
        self._perm_epoch, self._perm = -1, None

    # -- order ----------------------------------------------------------------------------------

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of `epoch` (cached: consecutive steps mostly stay in one epoch)."""
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n_windows, generator=g).numpy(), epoch
        return self._perm

    def global_indices(self, step: int) -> np.ndarray:
        """Window indices of the whole global batch of optimizer step `step` (all ranks)."""
        pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        epochs, within = np.divmod(pos, self.n_windows)
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out

    def rank_indices(self, step: int) -> np.ndarray:
        """This rank's contiguous share of `step`'s global batch."""
        per_rank = self.global_batch // self.world
        return self.global_indices(step)[self.rank * per_rank: (self.rank + 1) * per_rank]

    def epoch(self) -> float:
        """Epochs completed so far (fractional)."""
        return self.step * self.global_batch / self.n_windows

    # -- batches --------------------------------------------------------------------------------

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.rank_indices(self.step)
        self.step += 1
        return [_windows(self.tokens, idx[k: k + self.micro_batch], self.seq_len)
                for k in range(0, len(idx), self.micro_batch)]

    def __iter__(self):
        while True:
            yield self.next_batch()

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain ints only (safe for ``torch.load(weights_only=True)``). The world size and rank are
        not part of the state: the global batch sequence does not depend on them."""
        return {"version": STATE_VERSION, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "global_batch", "n_windows"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(f"the checkpoint's sampler has {key}={state[key]}, this run {getattr(self, key)}; "
                                f"resume with the same train.seed / data.seq_len / train.batch_size / data, "
                                f"or start a new run_dir")
        self.step = int(state["step"])


def val_windows(n_tokens: int, seq_len: int, token_budget: int, rank: int = 0, world: int = 1) -> range:
    """Window indices this rank evaluates: a contiguous block of the first ``token_budget // seq_len``
    windows (fewer if the split is shorter). Blocks of all ranks partition them; sizes differ by <= 1."""
    if token_budget < seq_len:
        raise DataError(f"eval.tokens={token_budget} is less than one sequence (data.seq_len={seq_len}); raise it")
    n = min(token_budget // seq_len, num_windows(n_tokens, seq_len))
    return range(rank * n // world, (rank + 1) * n // world)


def val_batches(val_tokens: np.ndarray, seq_len: int, token_budget: int, micro_batch: int,
                rank: int = 0, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's validation micro-batches ``(x, y)`` (last one may be smaller; a rank may get none).

    The same windows every evaluation. Ranks get unequal counts when W does not divide the number
    of windows: the evaluator must sum loss * tokens and tokens over ranks (token-weighted), and
    every rank must still join the all-reduce even with an empty list.
    """
    idx = np.asarray(val_windows(len(val_tokens), seq_len, token_budget, rank, world), dtype=np.int64)
    return [_windows(val_tokens, idx[k: k + micro_batch], seq_len) for k in range(0, len(idx), micro_batch)]
