"""Evaluation is token-weighted: checked against a hand computation over uneven batches."""

import torch

from amllm.evaluate import evaluate


class Bigram(torch.nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table(input_ids)})()


def test_token_weighted_mean_over_uneven_batches():
    model = Bigram()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 11, (b, 5), generator=g), torch.randint(0, 11, (b, 5), generator=g))
               for b in (3, 1, 2)]
    # hand computation: every token counts once, whatever batch it sits in
    total, count = 0.0, 0
    for x, y in batches:
        logp = torch.log_softmax(model.table.weight[x].double(), -1)
        total += -logp.gather(-1, y[..., None]).sum().item()
        count += y.numel()
    res = evaluate(model, batches, torch.device("cpu"))
    assert res["val_tokens"] == 30
    assert abs(res["val_loss"] - total / count) < 1e-6
    # a mean of per-batch means would weight the 1-sequence batch 3x too much: make sure we differ
    per_batch = sum(torch.nn.functional.cross_entropy(model(x).logits.reshape(-1, 11), y.reshape(-1)).item()
                    for x, y in batches) / 3
    assert abs(per_batch - res["val_loss"]) > 1e-4
    assert evaluate(model, batches, torch.device("cpu")) == res  # deterministic
