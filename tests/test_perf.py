"""Throughput and memory switches: chunked cross-entropy, activation checkpointing, per-block compile,
MFU. Every switch is checked against the plain path on the same weights and batch."""

from __future__ import annotations

import pytest
import torch

from amllm.config import ModelConfig
from amllm.model import build_model, load_llama_config, lm_loss

VOCAB = 32000


def _model(micro_model, **kw):
    return build_model(load_llama_config(ModelConfig(name=micro_model), vocab_size=VOCAB), seed=0, **kw)


def _batch(b=3, t=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (b, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _loss_and_grads(model, x, y, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x, targets=y, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---- chunked cross-entropy ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [16, 50, 120, 4096])  # uneven last chunk, exactly one row block, one chunk
def test_chunked_ce_matches_todays_path(micro_model, chunk):
    """fp32: the chunked loss and every gradient equal the plain path's (lm_head over the whole batch,
    then lm_loss on its fp32 copy -- what train.py did before) to <= 1e-6 relative."""
    x, y = _batch()
    plain = _model(micro_model)
    ref_loss = lm_loss(plain(input_ids=x).logits, y)  # today's path, by hand
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in plain.named_parameters()}
    loss, grads = _loss_and_grads(_model(micro_model, loss_chunk=chunk), x, y)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    worst = max(_rel(grads[n], ref[n]) for n in ref)
    assert worst <= 1e-6, worst
    # loss_chunk=0 inside the model is exactly the plain path
    loss0, grads0 = _loss_and_grads(_model(micro_model, loss_chunk=0), x, y)
    assert loss0 == ref_loss.detach() and all(torch.equal(grads0[n], ref[n]) for n in ref)


def test_chunked_ce_sum_reduction_no_grad_and_scaled_backward(micro_model):
    x, y = _batch(2, 33)
    m = _model(micro_model, loss_chunk=20)
    with torch.no_grad():  # evaluation: no gradient work, same value
        s = m(input_ids=x, targets=y, reduction="sum")
        ref = lm_loss(m(input_ids=x).logits, y, reduction="sum")
    assert abs(s.item() - ref.item()) <= 1e-6 * abs(ref.item())
    # the incoming gradient scales the kept gradients (loss / accum, DeepSpeed's scaling)
    _, g1 = _loss_and_grads(m, x, y)
    m.zero_grad(set_to_none=True)
    (m(input_ids=x, targets=y) * 0.25).backward()
    assert all(_rel(p.grad, 0.25 * g1[n]) <= 1e-6 for n, p in m.named_parameters())


def test_chunked_ce_under_bf16_autocast(micro_model):
    """bf16 autocast: the lm head runs in bf16 per chunk as it does for the whole batch; the loss agrees
    with the plain autocast path to bf16 rounding, and gradients to a few bf16 ulps."""
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = _loss_and_grads(_model(micro_model, loss_chunk=0), x, y)
        loss, grads = _loss_and_grads(_model(micro_model, loss_chunk=32), x, y)
    assert abs(loss.item() - ref_loss.item()) <= 1e-3 * abs(ref_loss.item())
    assert max(_rel(grads[n], ref[n]) for n in ref) < 2e-2
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_chunked_ce_keeps_no_full_logits(micro_model):
    """What the backward keeps: no tensor with batch x seq x vocab elements is saved by the chunked path
    (the plain path saves the fp32 logits for the softmax gradient)."""
    x, y = _batch(4, 64)
    n_full = 4 * 64 * VOCAB

    def biggest_saved(model):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, targets=y)
        return max(sizes)

    assert biggest_saved(_model(micro_model, loss_chunk=0)) >= n_full
    assert biggest_saved(_model(micro_model, loss_chunk=64)) < n_full / 4
