"""`pip install amllm` gives the optimizers with torch alone: the wheel, in a fresh virtualenv.

Builds the wheel from this checkout, installs it into a new virtualenv that sees none of this
environment's packages (torch comes from the same lock as the README's commands), and
runs a training loop with AMAdamW and AMSGD there. The trainer's packages must NOT have come along.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

LOOP = textwrap.dedent('''
    import importlib.util, torch
    from amllm.optim import AMAdamW, AMSGD
    assert importlib.util.find_spec("transformers") is None, "the trainer's packages came with the optimizers"
    import amllm.optim, pathlib
    assert (pathlib.Path(amllm.optim.__file__).parent / "csrc" / "am_cpu.cpp").is_file(), "kernel source not packaged"
    torch.manual_seed(0)
    X, w_true = torch.randn(256, 8), torch.randn(8, 1)
    y = X @ w_true
    for cls, kw in ((AMAdamW, dict(lr=0.05, weight_decay=0.01)), (AMSGD, dict(lr=0.05))):
        model = torch.nn.Linear(8, 1)
        opt = cls(model.parameters(), **kw)
        first = None
        for _ in range(60):
            loss = torch.nn.functional.mse_loss(model(X), y)
            first = first if first is not None else loss.item()
            opt.zero_grad(); loss.backward(); opt.step()
        assert loss.item() < 0.1 * first, (cls.__name__, first, loss.item())
        print(cls.__name__, "loss", round(first, 4), "->", round(loss.item(), 6), "beta", float(opt.last_beta))
''')


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_optimizer_only_wheel_in_a_fresh_venv(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(ROOT)])
    (wheel,) = (tmp_path / "dist").glob("amllm-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)  # no system site-packages
    py = str(tmp_path / "venv" / "bin" / "python")
    env = {**os.environ, "PIP_CONSTRAINT": str(ROOT / "requirements" / "lock.txt")}
    env.pop("PYTHONPATH", None)
    run([py, "-m", "pip", "install", "-q", str(wheel)], env=env)
    out = run([py, "-c", LOOP], env=env, cwd=tmp_path)  # not the checkout: the installed package only
    assert "AMAdamW loss" in out and "AMSGD loss" in out
