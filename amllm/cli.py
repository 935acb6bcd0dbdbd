"""`amllm-train`: the console entry point, the same as `python train.py` in the checkout.

train.py stays a script at the top of the repository (nanoGPT-style: read it top to bottom), so the
entry point runs that file; it needs the checkout (`pip install -e .`), where train.py sits next to
the package.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

TRAINER_MODULES = ("transformers", "datasets", "sentencepiece", "yaml", "tqdm", "numpy")


def require_trainer_dependencies() -> None:
    """One line instead of an ImportError traceback when amllm was installed for its optimizers only."""
    missing = [m for m in TRAINER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: the trainer needs {', '.join(missing)} (not installed); pip install -e \".[train]\" "
                 f"in the checkout, or pip install \"amllm[train]\"")


def main() -> None:
    script = Path(__file__).resolve().parent.parent / "train.py"
    if not script.is_file():
        sys.exit(f"error: {script} not found; amllm-train runs train.py from a source checkout "
                 f"(git clone, then pip install -e .)")
    require_trainer_dependencies()
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
