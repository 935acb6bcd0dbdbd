"""BatchSampler and val_batches on a synthetic stream tokens[i] = i, so every window is identifiable."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from amllm.data import BatchSampler, DataError, val_batches, val_windows
from amllm.data.sampler import epoch_seed

L = 8
TOKENS = np.arange(50 * L + 1, dtype=np.uint16)  # exactly 50 windows


def window_ids(batch) -> list[int]:
    """Window index of each sequence of a rank's micro-batches, in order."""
    return [int(x[0]) // L for x, _ in batch for x in x]


def test_windows_are_the_right_tokens_shifted_by_one():
    s = BatchSampler(TOKENS, L, global_batch=6, micro_batch=3, seed=1)
    batch = s.next_batch()
    assert len(batch) == 2
    for x, y in batch:
        assert x.dtype == torch.int64 and x.shape == (3, L) and y.shape == (3, L)
        for xi, yi in zip(x, y):
            i = int(xi[0]) // L
            w = torch.from_numpy(TOKENS[i * L: i * L + L + 1].astype(np.int64))
            assert torch.equal(xi, w[:-1]) and torch.equal(yi, w[1:])
    assert TOKENS.dtype == np.uint16  # the stream itself is never converted


def test_order_is_deterministic_per_seed_and_differs_between_seeds():
    run = lambda seed: window_ids(BatchSampler(TOKENS, L, 10, 5, seed=seed).next_batch())  # noqa: E731
    a = BatchSampler(TOKENS, L, 10, 5, seed=3)
    b = BatchSampler(TOKENS, L, 10, 5, seed=3)
    assert [window_ids(a.next_batch()) for _ in range(7)] == [window_ids(b.next_batch()) for _ in range(7)]
    assert run(3) != run(4)
    # the order is torch.randperm from a generator seeded with (seed, epoch)
    g = torch.Generator().manual_seed(epoch_seed(3, 0))
    assert window_ids(BatchSampler(TOKENS, L, 10, 5, seed=3).next_batch()) == torch.randperm(50, generator=g)[:10].tolist()


def test_each_epoch_covers_every_window_once_with_a_new_order():
    s = BatchSampler(TOKENS, L, global_batch=7, micro_batch=7, seed=0)  # 7 does not divide 50: batches straddle epochs
    seen = [i for _ in range(100 // 7 + 1) for i in window_ids(s.next_batch())][:100]
    epoch0, epoch1 = seen[:50], seen[50:]
    assert sorted(epoch0) == list(range(50)) and sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1


@pytest.mark.parametrize("world,micro", [(2, 4), (4, 2), (4, 4), (8, 1)])
def test_rank_shards_are_disjoint_and_union_is_the_single_process_batch(world, micro):
    single = BatchSampler(TOKENS, L, global_batch=16, micro_batch=8, seed=5)
    ranks = [BatchSampler(TOKENS, L, 16, micro, rank=r, world=world, seed=5) for r in range(world)]
    for _ in range(5):  # step 3 straddles epochs 0 and 1
        ref = single.next_batch()
        ref_x = torch.cat([x for x, _ in ref])
        parts = [r.next_batch() for r in ranks]
        ids = [window_ids(p) for p in parts]
        assert all(len(i) == 16 // world for i in ids)
        # rank r holds exactly positions [r*B/W, (r+1)*B/W) of the global batch: disjoint, union = all
        # (compare positions, not window ids: a batch straddling two epochs may repeat a window)
        per = 16 // world
        assert ids == [window_ids(ref)[r * per:(r + 1) * per] for r in range(world)]
        # concatenating the ranks' micro-batches in rank order gives exactly the one-process batch
        assert torch.equal(torch.cat([x for p in parts for x, _ in p]), ref_x)


def test_state_dict_round_trip_continues_with_the_next_batch():
    s = BatchSampler(TOKENS, L, 8, 4, seed=9)
    for _ in range(3):
        s.next_batch()
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    expected = [s.next_batch() for _ in range(10)]  # crosses into epoch 1
    resumed = BatchSampler(TOKENS, L, 8, 4, seed=9)
    resumed.load_state_dict(state)
    for e in expected:
        got = resumed.next_batch()
        assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(got, e))
    # resuming on another world size continues the same global batch sequence
    halves = [BatchSampler(TOKENS, L, 8, 2, rank=r, world=2, seed=9) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert window_ids(halves[0].next_batch()) + window_ids(halves[1].next_batch()) == window_ids(expected[0])


def test_sampler_errors_are_one_line():
    with pytest.raises(DataError, match=r"^train.batch_size=10 is not divisible by world size 4; use a multiple of 4"):
        BatchSampler(TOKENS, L, 10, 1, rank=0, world=4)
    with pytest.raises(DataError, match=r"^train.micro_batch_size=3 does not divide the per-rank batch 8 "):
        BatchSampler(TOKENS, L, 16, 3, rank=1, world=2)
    with pytest.raises(DataError, match=r"fewer than data.seq_len\+1=9"):
        BatchSampler(TOKENS[:8], L, 2, 1)
    s = BatchSampler(TOKENS, L, 8, 4, seed=9)
    with pytest.raises(DataError, match=r"checkpoint's sampler has seed=1, this run 9; resume with the same"):
        s.load_state_dict({**s.state_dict(), "seed": 1})


def test_val_batches_cover_the_same_windows_for_any_world_size():
    budget = 23 * L + 5  # 23 windows
    expected = list(range(23))
    for world in (1, 2, 3, 5):
        per_rank = [val_batches(TOKENS, L, budget, micro_batch=4, rank=r, world=world) for r in range(world)]
        ids = [i for b in per_rank for i in window_ids(b)]
        assert ids == expected, world
        xs = torch.cat([x for b in per_rank for x, _ in b])
        assert torch.equal(xs, torch.from_numpy(TOKENS[: 23 * L].astype(np.int64)).view(23, L))
        counts = [len(val_windows(len(TOKENS), L, budget, r, world)) for r in range(world)]
        assert sum(counts) == 23 and max(counts) - min(counts) <= 1
    assert len(val_windows(len(TOKENS), L, 10**9)) == 50  # budget beyond the split: all windows, no error
    with pytest.raises(DataError, match=r"^eval.tokens=4 is less than one sequence \(data.seq_len=8\)"):
        val_batches(TOKENS, L, 4, 2)
