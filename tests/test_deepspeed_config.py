"""validate_ds_config: the trainer config and the DeepSpeed JSON never contradict each other silently.

Plus the launch test: the real `deepspeed` CLI starts 2 ranks on a shipped JSON, and the run
reproduces the 1-process oracle.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amllm.config import ConfigError, config_from_dict
from amllm.parallel.deepspeed_backend import validate_ds_config

ROOT = Path(__file__).resolve().parent.parent
JSONS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def cfg(precision="fp32", batch=16, micro=2, clip=1.0):
    return config_from_dict({"train": {"batch_size": batch, "micro_batch_size": micro, "precision": precision},
                             "optim": {"grad_clip": clip}})


def test_auto_and_missing_keys_are_derived_from_the_trainer_config():
    ds = validate_ds_config({"train_batch_size": "auto", "zero_optimization": {"stage": 2}}, cfg("bf16"), world_size=4)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2  # 16 / (2 x 4)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": True}
    assert ds["zero_allow_untested_optimizer"] is True


def test_agreeing_explicit_values_pass_unchanged():
    ds = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
          "gradient_clipping": 1.0, "bf16": {"enabled": False}}
    assert validate_ds_config(ds, cfg(), world_size=2)["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize("key,value,names", [
    ("train_batch_size", 32, r"train_batch_size=32 disagrees with train\.batch_size=16"),
    ("train_micro_batch_size_per_gpu", 4, r"train_micro_batch_size_per_gpu=4 disagrees with train\.micro_batch_size=2"),
    ("gradient_accumulation_steps", 1, r"gradient_accumulation_steps=1 disagrees with train\.batch_size / "),
    ("gradient_clipping", 0.5, r"gradient_clipping=0\.5 disagrees with optim\.grad_clip=1\.0"),
])
def test_a_disagreeing_value_is_a_one_line_error_naming_both_keys(key, value, names):
    with pytest.raises(ConfigError, match=names) as e:
        validate_ds_config({key: value}, cfg(), world_size=2)
    assert "\n" not in str(e.value) and '"auto"' in str(e.value)


def test_bf16_json_with_fp32_trainer_is_an_error():
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True disagrees with train\.precision='fp32'"):
        validate_ds_config({"bf16": {"enabled": True}}, cfg("fp32"), world_size=1)


@pytest.mark.parametrize("ds,msg", [
    ({}, r"train\.batch_size=16 is not a multiple of train\.micro_batch_size x world size = 2 x 3"),
    ({"optimizer": {"type": "AdamW"}}, r"remove it: the trainer builds the optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, r"'scheduler'; remove it"),
    ({"fp16": {"enabled": True}}, r"fp16\.enabled=true is not supported"),
    ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, r"elastic_checkpoint=true drops the AM"),
    ({"zero_allow_untested_optimizer": False}, r"zero_allow_untested_optimizer=false rejects AM-AdamW"),
])
def test_refusals(ds, msg):
    world = 3 if not ds else 2
    with pytest.raises(ConfigError, match=msg):
        validate_ds_config(ds, cfg(), world_size=world)


def test_bf16_pure_has_no_deepspeed_equivalent():
    with pytest.raises(ConfigError, match=r"bf16_pure has no DeepSpeed equivalent.*use train\.precision=bf16"):
        validate_ds_config({}, cfg("bf16_pure"), world_size=1)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        validate_ds_config(tmp_path / "missing.json", cfg(), 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        validate_ds_config(bad, cfg(), 1)


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_shipped_jsons_validate_for_their_precision_only(path):
    precision = "bf16" if path.stem.endswith("bf16") else "fp32"
    ds = validate_ds_config(path, cfg(precision), world_size=2)
    assert ds["bf16"]["enabled"] == (precision == "bf16")
    assert ds["zero_optimization"]["stage"] == int(path.stem[4])
    other = "fp32" if precision == "bf16" else "bf16"
    with pytest.raises(ConfigError, match="bf16"):
        validate_ds_config(path, cfg(other), world_size=2)


def test_json_is_not_modified_in_place():
    ds = {"zero_optimization": {"stage": 1}}
    validate_ds_config(ds, cfg(), 2)
    assert ds == {"zero_optimization": {"stage": 1}}


def test_deepspeed_version_range_is_checked_and_matches_pyproject():
    import re
    import warnings

    from amllm.parallel.deepspeed_compat import DEEPSPEED_TESTED, check_deepspeed_version

    low, high = DEEPSPEED_TESTED
    pins = re.findall(r'"deepspeed([<>=][^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [f">={low},<{high}"] * 2, pins  # the deepspeed and test extras
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_deepspeed_version("0.19.8")  # the tested one: silent
    with pytest.warns(UserWarning, match=r"^deepspeed 0\.20\.1 is untested .*pip install 'deepspeed>=0\.16,<0\.20'"):
        check_deepspeed_version("0.20.1")
    with pytest.raises(ConfigError, match=r"deepspeed 0\.15\.4 is older .*pip install"):
        check_deepspeed_version("0.15.4")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_cli_launch_reproduces_one_process(tmp_path):
    """`deepspeed --num_gpus 2` (the real launcher: it sets RANK/WORLD_SIZE/MASTER_* and passes
    --local_rank) runs build_engine on configs/deepspeed/zero2_fp32.json; losses and β match the
    1-process oracle."""
    pytest.importorskip("deepspeed")
    from tests.dist_cases import free_port, reference_run

    exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    out = tmp_path / "launch.json"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([exe, "--num_gpus", "2", "--master_port", str(free_port()), "tests/ds_launch_entry.py",
                           "--deepspeed_config", "configs/deepspeed/zero2_fp32.json", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    ref = reference_run(3, per_layer=False)
    assert res["world"] == 2 and res["engine_optimizer"] == "DeepSpeedZeroOptimizer"
    torch.testing.assert_close(torch.tensor(res["loss"]), torch.tensor(ref["loss"]), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(res["beta"]).double(), torch.stack(ref["beta"]), rtol=2e-5, atol=1e-6)


def test_optimizer_offload_allows_the_client_optimizer():
    zero = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert validate_ds_config({"zero_optimization": zero}, cfg(), 2)["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ConfigError, match=r"zero_force_ds_cpu_optimizer=true rejects AM-AdamW"):
        validate_ds_config({"zero_optimization": zero, "zero_force_ds_cpu_optimizer": True}, cfg(), 2)
    assert "zero_force_ds_cpu_optimizer" not in validate_ds_config({"zero_optimization": {"stage": 2}}, cfg(), 2)
