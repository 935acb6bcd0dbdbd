"""docs/usage.md: every ```python block runs as written, on its own, in a fresh process.

The blocks assert what the page claims (HF Trainer and accelerate resume bit-for-bit, ...), so a
claim that stops being true fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "usage.md").read_text(), flags=re.S)
TITLES = [re.findall(r"^## (.+)$", part, flags=re.M)[-1]
          for part in re.split(r"```python\n.*?```", (ROOT / "docs" / "usage.md").read_text(), flags=re.S)[:-1]]


def test_the_page_has_its_examples():
    assert len(BLOCKS) >= 4 and len(TITLES) == len(BLOCKS)


@pytest.mark.parametrize("code", BLOCKS, ids=[re.sub(r"\W+", "_", t).strip("_") for t in TITLES])
def test_example_runs(code, tmp_path):
    if "accelerate" in code or "transformers" in code:
        pytest.importorskip("accelerate")
    # this checkout's amllm, not whichever copy is installed
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
