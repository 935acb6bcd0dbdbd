"""Every private name of DeepSpeed amllm reads, in one place, with the versions it was tested with.

A DeepSpeed upgrade touches this file only: re-run tools/ds_probe.py and tests/test_deepspeed_zero.py,
then widen :data:`DEEPSPEED_TESTED` (pyproject's ``deepspeed`` extra says the same; a test checks they
agree). What each name is, measured, is in docs/deepspeed_notes.md. The rest of amllm's DeepSpeed code
(zero_adapter.py, deepspeed_backend.py) uses DeepSpeed's public API and what this module returns.

| what                                    | DeepSpeed's (private) names                                    |
|-----------------------------------------|----------------------------------------------------------------|
| ZeRO-1/2 fp32 shards, bit16 copies      | single_partition_of_fp32_groups, parallel_partitioned_bit16_groups, bit16_groups, real_dp_process_group, cpu_offload |
| BF16_Optimizer (ZeRO-1 + bf16) shards   | fp32_groups_flat_partition, bf16_groups, real_dp_process_group |
| fragment addresses (ZeRO-1/2, BF16)     | param._hp_mapping.hp_fragment_address / lp_fragment_address   |
| ZeRO-3 shards and partitions            | fp32_partitioned_groups_flat, fp16_groups, fp16_partitioned_groups, sub_group_to_group_id, dp_process_group, offload_optimizer, swap_optimizer, param.ds_numel / ds_shape / partition_numel(), _reassign_or_swap_out_partitioned_parameters |
| re-link fragment views to the state     | _hp_optimizer_states_linked                                    |
| the client optimizer                    | engine.basic_optimizer                                         |
| per-step host check of the grad norm    | is_invalid_grad_norm in stage_1_and_2, stage3, bf16_optimizer  |
| per-rank optimizer files                | *zero_pp_rank_<r>_mp_rank_*_optim_states.pt: optimizer_state_dict / base_optimizer_state, single_partition_of_fp32_groups / fp32_flat_groups (pickled: weights_only=False) |
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import ConfigError

#: [lowest, above highest) DeepSpeed versions this module is tested with.
DEEPSPEED_TESTED = ("0.16", "0.20")


def check_deepspeed_version(version: str) -> None:
    """Refuse a DeepSpeed older than this module knows; warn (one line) for a newer, untested one."""
    from packaging.version import Version

    low, high = DEEPSPEED_TESTED
    pin = f"pip install 'deepspeed>={low},<{high}'"
    if Version(version) < Version(low):
        raise ConfigError(f"deepspeed {version} is older than the adapter supports ({low}); {pin}")
    if Version(version) >= Version(high):
        warnings.warn(f"deepspeed {version} is untested with amllm's ZeRO adapter (tested: >={low},<{high}; it reads "
                      f"private attributes, see docs/deepspeed_notes.md); {pin} if the run misbehaves", stacklevel=2)


class Shard:
    """One flat fp32 tensor DeepSpeed hands to the client optimizer, and what the adapter needs of it."""

    __slots__ = ("flat", "group", "slices", "refresh")

    def __init__(self, flat: torch.Tensor, group: int, slices: list, refresh: Optional[Callable[[], None]]):
        self.flat = flat  # the fp32 tensor the client updates (1-D)
        self.group = group  # index of its param group
        # [(layer, start, end, param, offset in the flattened param)] of real elements; the rest is padding
        self.slices = slices
        self.refresh = refresh  # () -> None: copy this shard's fp32 into its bit16 copy (None: nothing to do)


class ZeroView:
    """What a ZeRO optimizer keeps, as the adapter needs it: this rank's shards, whether the optimizer
    state is offloaded, and the data-parallel group of each param group."""

    def __init__(self, kind: str, shards: list[Shard], offload: bool, dp_groups: list):
        self.kind, self.shards, self.offload, self.dp_groups = kind, shards, offload, dp_groups


def zero_view(ds_opt, layer_of: dict[int, int]) -> ZeroView:
    """The shards of ``ds_opt`` (DeepSpeedZeroOptimizer, ..._Stage3 or BF16_Optimizer), each with its real
    elements located in the model's parameters and labelled with ``layer_of[id(param)]``."""
    kind = type(ds_opt).__name__
    if kind == "DeepSpeedZeroOptimizer":
        return ZeroView(kind, _shards_zero12(ds_opt, layer_of), bool(ds_opt.cpu_offload), ds_opt.real_dp_process_group)
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        return ZeroView(kind, _shards_zero3(ds_opt, layer_of), bool(ds_opt.offload_optimizer or ds_opt.swap_optimizer),
                        [ds_opt.dp_process_group])
    if kind == "BF16_Optimizer":
        shards = [Shard(flat, i, _fragment_slices(ds_opt.bf16_groups[i], layer_of), None)
                  for i, flat in enumerate(ds_opt.fp32_groups_flat_partition)]
        return ZeroView(kind, shards, False, ds_opt.real_dp_process_group)
    raise RuntimeError(f"ZeroAMAdapter does not know DeepSpeed's {kind}; see docs/deepspeed_notes.md")


def _shards_zero12(ds_opt, layer_of) -> list[Shard]:
    shards = []
    pid_of = [torch.distributed.get_rank(group=g) for g in ds_opt.real_dp_process_group]
    for i, flat in enumerate(ds_opt.single_partition_of_fp32_groups):
        def refresh(i=i, flat=flat):
            ds_opt.parallel_partitioned_bit16_groups[i][pid_of[i]].data.copy_(flat.data)
        shards.append(Shard(flat, i, _fragment_slices(ds_opt.bit16_groups[i], layer_of), refresh))
    return shards


def _fragment_slices(lp_params, layer_of) -> list[tuple]:
    """(layer, start, end, param, offset in param) in the flat fp32 slice, from DeepSpeed's lp→hp
    fragment addresses."""
    out = []
    for p in lp_params:
        hp = getattr(p, "_hp_mapping", None)
        if hp is not None:  # None: no element of p in this rank's slice
            a = hp.hp_fragment_address
            out.append((layer_of[id(p)], a.start, a.start + a.numel, p, hp.lp_fragment_address.start))
    return sorted(out, key=lambda s: s[1])


def _shards_zero3(ds_opt, layer_of) -> list[Shard]:
    rank = torch.distributed.get_rank(group=ds_opt.dp_process_group)
    shards = []
    for s, flat in enumerate(ds_opt.fp32_partitioned_groups_flat):
        slices, off = [], 0
        for p, part in zip(ds_opt.fp16_groups[s], ds_opt.fp16_partitioned_groups[s]):
            # every rank holds ceil(numel / world) elements of p; the last ranks' tails are padding
            real = max(0, min(p.ds_numel - rank * p.partition_numel(), part.ds_numel))
            if real:
                slices.append((layer_of[id(p)], off, off + real, p, rank * p.partition_numel()))
            off += part.ds_numel
        if off != flat.numel():
            raise RuntimeError(f"ZeRO-3 sub-group {s}: partitions add up to {off} elements, the fp32 flat has "
                               f"{flat.numel()}; this DeepSpeed version lays sub-groups out differently "
                               f"(see docs/deepspeed_notes.md)")
        shards.append(Shard(flat, ds_opt.sub_group_to_group_id[s], slices,
                            lambda s=s: ds_opt._reassign_or_swap_out_partitioned_parameters(s)))
    return shards


def full_shape(param: torch.Tensor) -> tuple:
    """A parameter's whole shape (ZeRO-3 replaces ``param.shape`` by its empty partition's)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def relink_fragment_states(ds_opt) -> None:
    """Let DeepSpeed link its fragment views to the optimizer state once more: it links them after its
    first step call, when a deferred AM state was still empty (or since replaced by a checkpoint load)."""
    if hasattr(ds_opt, "_hp_optimizer_states_linked"):
        ds_opt._hp_optimizer_states_linked = False


def client_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer handed to ``deepspeed.initialize`` (DeepSpeed wraps it in ``engine.optimizer``)."""
    return engine.basic_optimizer


def _valid_norm(norm) -> bool:
    """Stands in for DeepSpeed's ``is_invalid_grad_norm`` (see :func:`skip_host_norm_check`)."""
    return False


def skip_host_norm_check() -> None:
    """Remove the host read DeepSpeed's ZeRO-1/2/3 and BF16 optimizers make every step.

    They call ``is_invalid_grad_norm(norm)`` -- ``bool()`` of a device tensor, one GPU sync per step --
    to skip a step whose gradient norm is NaN/inf (whenever clipping is on or overflow checks are; in
    DeepSpeed 0.19 that is every step of every recipe). With an AM optimizer that decision is already
    taken on the device: a non-finite gradient makes its all-reduced statistics non-finite on every rank
    and it skips its update (``skip_nonfinite``). What DeepSpeed does instead when the norm is bad stays
    safe: the clip coefficient of a NaN norm is NaN, so the scaled gradients are NaN and the AM step
    skips; a -1 "invalid" sentinel leaves the (non-finite) gradients unscaled, same outcome. So the
    check answers "valid" in the modules that imported it. Process-wide; only called for AM optimizers
    (tested: tests/test_gpu_path.py, NaN gradients under ZeRO-2 skip the update)."""
    for name in ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
                 "deepspeed.runtime.bf16_optimizer"):
        module = importlib.import_module(name)
        if hasattr(module, "is_invalid_grad_norm"):
            module.is_invalid_grad_norm = _valid_norm


def rank_optimizer_state(root: Path, rank: int) -> tuple[dict, list]:
    """From DeepSpeed's optimizer file of ``rank`` under ``root`` (= step-N/deepspeed): the client
    optimizer's state dict and this rank's fp32 flats (ZeRO-1/2: per group; ZeRO-3: per sub-group).
    DeepSpeed pickles these files itself, so they are read with ``weights_only=False``, as its own
    loader does (amllm's files never need it)."""
    optim_file = next(root.glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt"), None)  # bf16_... under bf16
    if optim_file is None:
        raise ValueError(f"{root}: no optimizer file of rank {rank} (zero_pp_rank_{rank}_*_optim_states.pt)")
    osd = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    base = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")
    if not isinstance(base, dict) or "state" not in base:
        raise ValueError(f"{optim_file}: no AM optimizer state where DeepSpeed {osd.get('ds_version', '?')} "
                         f"keeps it; see docs/deepspeed_notes.md")
    return base, osd.get("single_partition_of_fp32_groups") or osd.get("fp32_flat_groups")
