"""optim hook: a padded flat shard with an element→layer map steps like the separate tensors.

ZeRO flat partitions end in padding that belongs to no layer (``set_layer_map`` slices leave
it out, i.e. layer id ``n_layers``); per-layer β must equal the one of the unflattened tensors.
"""
import pytest
import torch

from amllm.optim import AMSGD, AMAdamW


@pytest.mark.parametrize("cls", [AMAdamW, AMSGD])
def test_padded_flat_with_layer_map_matches_separate_tensors(cls):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    flat = torch.nn.Parameter(torch.cat([a.detach(), b.detach(), torch.zeros(2, dtype=torch.float64)]))
    kw = dict(per_layer=True, weight_decay=0.1, lr=0.3)
    ref, sharded = cls([a, b], **kw), cls([flat], **kw)
    sharded.set_layer_map({flat: [(0, 0, 4), (1, 4, 7)]}, 2)
    for _ in range(5):
        # gradient of a noisy quadratic, so that β moves off β_max (random g keeps it clipped)
        g = torch.cat([a, b]).detach() * torch.linspace(0.5, 3.0, 7, dtype=torch.float64) + 0.1 * torch.randn(7, dtype=torch.float64)
        a.grad, b.grad = g[:4].clone(), g[4:].clone()
        flat.grad = torch.cat([g, torch.zeros(2, dtype=torch.float64)])
        ref.step()
        sharded.step()
        # the packed per-layer sums (A, B, C[, D], count): continuous, unlike a clipped β
        torch.testing.assert_close(sharded.last_sums, ref.last_sums, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sharded.last_beta, ref.last_beta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat.detach()[:7], torch.cat([a, b]).detach(), rtol=1e-12, atol=1e-12)
    assert torch.all(flat.detach()[7:] == 0)  # padding stays zero
