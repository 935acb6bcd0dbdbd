"""Validation loss of a checkpoint, from its run directory alone.

    python -m tools.evaluate runs/default                    # latest checkpoint
    python -m tools.evaluate runs/default/step-100 eval.tokens=1000000
    torchrun --nproc_per_node 2 tools/evaluate.py runs/x     # same result on any world size

Runs train.py's --eval-only path with the run's own config.yaml; extra arguments are overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path



def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    target = Path(argv.pop(0))
    run_dir = target.parent if target.name.startswith("step-") else target
    config = run_dir / "config.yaml"
    if not config.is_file():
        print(f"error: {run_dir}: no config.yaml (is this a run directory?)", file=sys.stderr)
        return 2
    resume = str(target) if target.name.startswith("step-") else "auto"
    import train

    return train.run_cli(["--config", str(config), "--eval-only", f"run_dir={run_dir}",
                          f"checkpoint.resume={resume}", *argv])


if __name__ == "__main__":
    sys.exit(main())
