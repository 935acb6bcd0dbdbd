"""Atomic step-N/ directories and safe loading."""

import warnings
from pathlib import Path

import pytest
import torch

from amllm import checkpoint as ckpt


def _save(run, step, keep=None, payload=None):
    def write(tmp):
        ckpt.save_torch(payload if payload is not None else {"w": torch.full((3,), float(step))}, tmp / "model.pt")
    return ckpt.save_checkpoint(run, step, {"model_fingerprint": "m"}, write, is_main=True, keep=keep)


def test_save_list_latest_prune(tmp_path):
    for s in (10, 20, 30):
        _save(tmp_path, s, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-20", "step-30"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-30" and ckpt.read_meta(latest)["step"] == 30
    assert torch.equal(ckpt.load_torch(latest / "model.pt")["w"], torch.full((3,), 30.0))
    assert not list(tmp_path.glob(".tmp-*"))


def test_incomplete_and_corrupt_are_skipped(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / ".tmp-step-3").mkdir()                      # a save killed before the rename
    (tmp_path / "step-4").mkdir()                           # no meta.json: never counts
    (tmp_path / "step-2" / "meta.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-2.*corrupt"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step-1"


def test_validate_hook_falls_back(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "step-2" / "model.pt").write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = ckpt.latest_checkpoint(tmp_path, validate=lambda p: ckpt.load_torch(p / "model.pt"))
    assert got.name == "step-1" and "step-2" in str(w[0].message)


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 5)
    _save(tmp_path, 5, payload={"w": torch.zeros(1)})
    assert torch.equal(ckpt.load_torch(tmp_path / "step-5" / "model.pt")["w"], torch.zeros(1))


def test_writer_error_leaves_previous(tmp_path):
    _save(tmp_path, 1)

    def boom(tmp):
        raise OSError("No space left on device")

    # an OSError becomes one CheckpointSaveError naming the survivor; the temporary is cleaned up
    with pytest.raises(ckpt.CheckpointSaveError, match="No space left on device.*step-1 is intact"):
        ckpt.save_checkpoint(tmp_path, 2, {}, boom, is_main=True)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-1"
    assert not list(tmp_path.glob(".tmp-*"))


class Evil:  # an arbitrary object that weights_only loading must refuse
    pass


def test_load_refuses_pickled_objects(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"evil.pt: cannot be read"):
        ckpt.load_torch(tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"missing"):
        ckpt.load_torch(tmp_path / "nope.pt")


# ---- whole per-parameter state (cross-backend resume) ----------------------------------------------


def _stepped_am(params, groups):
    from amllm.optim import AMAdamW

    opt = AMAdamW(groups(params), lr=0.1, per_layer=True)
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn_like(p)
        opt.step()
    return opt


def test_optimizer_state_by_name_loads_into_another_parameter_order():
    """optimizer.pt (index-keyed) -> by name -> an optimizer whose groups list the same parameters in
    another order: every parameter gets its own moments back (checked against the source by name)."""
    torch.manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s)) for n, s in (("a.w", (3, 2)), ("b.w", (4,)), ("c.w", (2, 2)))}
    src = _stepped_am(params, lambda p: [{"params": [p["a.w"], p["b.w"]]}, {"params": [p["c.w"]], "weight_decay": 0.0}])
    names = [["a.w", "b.w"], ["c.w"]]
    full = ckpt.optimizer_by_name(src.state_dict(), names)
    assert set(full["state"]) == {"a.w", "b.w", "c.w"} and full["param_groups"][1]["params"] == ["c.w"]

    other = {n: torch.nn.Parameter(torch.zeros_like(p)) for n, p in params.items()}
    from amllm.optim import AMAdamW

    dst = AMAdamW([{"params": [other["b.w"], other["a.w"]]}, {"params": [other["c.w"]], "weight_decay": 0.0}],
                  lr=0.1, per_layer=True)
    dst.load_state_dict(ckpt.optimizer_by_index(full, [["b.w", "a.w"], ["c.w"]]))
    for n in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(dst.state[other[n]][key], src.state[params[n]][key]), (n, key)
    assert torch.equal(dst.state_dict()["am_state"]["pi"], src.state_dict()["am_state"]["pi"])
    with pytest.raises(ckpt.CheckpointError, match="param group 0 holds other parameters"):
        ckpt.optimizer_by_index(full, [["a.w", "c.w"], ["b.w"]])


def test_fault_injection_installs_nothing_by_default(monkeypatch):
    """The test hooks stay out of a normal run: no forward hook, the sampler's draw untouched."""
    from amllm import fault_injection

    for k in ("AMLLM_TEST_NAN_AT_STEP", "AMLLM_TEST_NAN_GRAD_AT_STEP", "AMLLM_TEST_CRASH_AT_STEP"):
        monkeypatch.delenv(k, raising=False)
    model = torch.nn.Linear(2, 2)

    class Sampler:
        step = 0

        def next_batch(self):
            return []

    sampler = Sampler()
    draw = sampler.next_batch
    fault_injection.install(model, sampler, 0, Path("."))
    assert not model._forward_hooks and sampler.next_batch == draw
    monkeypatch.setenv("AMLLM_TEST_NAN_AT_STEP", "1")
    fault_injection.install(model, sampler, 0, Path("."))
    assert len(model._forward_hooks) == 1
