"""FSDP2 and DDP with AM-AdamW: 2 ranks give the β's and losses of 1 process; DCP resharding.

FSDP2: ``apply_fsdp2`` shards every block and the root; AM-AdamW over the DTensor parameters
reduces its partial sums over the mesh by itself (``reducer=None``). DDP: every rank already
holds the whole averaged gradient, so AM-AdamW must NOT reduce -- the negative control does
reduce and counts everything twice. The oracle is ``tests/dist_cases.reference_run``.
"""
import pytest
import torch
import torch.multiprocessing as mp

from tests.dist_cases import free_port, reference_run

pytestmark = [pytest.mark.slow, pytest.mark.compat]

STEPS = 4
FP32 = dict(rtol=2e-5, atol=1e-6)


def _spawn(cases, tmp_path, world):
    from tests.torch_dist_worker import run_cases

    out = tmp_path / f"results_{world}.pt"
    mp.spawn(run_cases, args=(world, free_port(), cases, str(out)), nprocs=world)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp") / "step-2"


@pytest.fixture(scope="module")
def results(tmp_path_factory, ckpt):
    tmp = tmp_path_factory.mktemp("torchdist")
    two = _spawn([dict(name="fsdp2", backend="fsdp2", steps=STEPS),
                  dict(name="fsdp2_per_layer", backend="fsdp2", steps=STEPS, per_layer=True),
                  dict(name="fsdp2_save", backend="fsdp2", steps=2, per_layer=True, save=str(ckpt)),
                  dict(name="fsdp2_bf16", backend="fsdp2", steps=2, precision="bf16"),
                  dict(name="ddp", backend="ddp", steps=STEPS),
                  dict(name="ddp_double_reduce", backend="ddp", steps=STEPS, double_reduce=True)], tmp, world=2)
    # the run saved on 2 ranks resumes on 1 (FSDP2 over a 1-rank mesh: DCP reshards)
    one = _spawn([dict(name="fsdp2_resume_1rank", backend="fsdp2", steps=STEPS, per_layer=True, load=str(ckpt))],
                 tmp, world=1)
    return {**two, **one}


@pytest.fixture(scope="module")
def oracle():
    return {False: reference_run(STEPS, per_layer=False), True: reference_run(STEPS, per_layer=True)}


def _assert_matches(res, ref, steps, **tol):
    for i, t in enumerate(steps):
        assert abs(res["loss"][i] - ref["loss"][t]) <= tol["rtol"] * abs(ref["loss"][t]) + tol["atol"], (t, res["loss"])
        torch.testing.assert_close(res["beta"][i], ref["beta"][t], **tol)
        torch.testing.assert_close(res["sums"][i], ref["sums"][t], rtol=tol["rtol"] * 10, atol=tol["atol"])


@pytest.mark.parametrize("name,per_layer", [("fsdp2", False), ("fsdp2_per_layer", True), ("ddp", False)])
def test_two_ranks_match_one_process(results, oracle, name, per_layer):
    res, ref = results[name], oracle[per_layer]
    _assert_matches(res, ref, range(STEPS), **FP32)
    assert abs(res["eval_loss"] - ref["eval_loss"][-1]) < 1e-5
    if name.startswith("fsdp2"):
        assert res["param_type"] == "DTensor"
        # one all-reduce of the packed sums per step: 4 sums + a count, x layers when per-layer
        n_layers = ref["beta"][0].numel()
        assert all(c == [5 * n_layers] for c in res["opt_all_reduces"]), res["opt_all_reduces"]
    if per_layer:
        assert any((b < 0.85).any() for b in ref["beta"])


def test_fsdp2_bf16_mixed_precision(results, oracle):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 shards, bf16 compute. Bound
    as for DeepSpeed bf16: the sums of step 1 (same fp32 weights, bf16 gradients) to 2e-3 of
    their largest entry, β of step 2 to 0.01, losses to 2%."""
    res, ref = results["fsdp2_bf16"], oracle[False]
    assert res["param_type"] == "DTensor"
    err = ((res["sums"][0] - ref["sums"][0]).abs().max() / ref["sums"][0].abs().max()).item()
    assert err < 2e-3, err
    torch.testing.assert_close(res["beta"][1], ref["beta"][1], rtol=0, atol=0.01)
    torch.testing.assert_close(torch.tensor(res["loss"]), torch.tensor(ref["loss"][:2]), rtol=2e-2, atol=0)
    assert res["loss"] != pytest.approx(ref["loss"][:2], rel=1e-6)  # it did compute in bf16


def test_ddp_does_not_reduce_and_reducing_would_double_count(results, oracle):
    assert all(c == [] for c in results["ddp"]["opt_all_reduces"])  # no collective in the optimizer
    bad, ref = results["ddp_double_reduce"], oracle[False]
    torch.testing.assert_close(bad["sums"][1], 2 * ref["sums"][1], rtol=1e-4, atol=1e-6)  # counted twice
    with pytest.raises(AssertionError):
        _assert_matches(bad, ref, range(STEPS), **FP32)


def test_fsdp2_saved_on_two_ranks_resumes_on_one(results, oracle):
    res, ref = results["fsdp2_resume_1rank"], oracle[True]
    assert res["extra"] == {"step": 2, "sampler": {"pos": 16}}
    # steps 3 and 4 after the reshard continue the single-process trajectory (β state, prev lr,
    # moments all restored: a fresh β state would restart π and r, and β would differ)
    _assert_matches(res, ref, range(2, STEPS), **FP32)
    assert abs(res["eval_loss"] - ref["eval_loss"][-1]) < 1e-5
