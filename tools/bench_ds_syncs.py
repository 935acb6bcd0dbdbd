"""DeepSpeed's own host syncs per step, and what they cost: each ZeRO config with overlap_comm on and off.

    python -m tools.bench_ds_syncs [--steps 18] [--ranks 1] [--device cpu]

For every config it runs train.py (tiny model, one micro-batch of 8 x 256 per step, the embedded corpus, fp32) with ``train.sync_debug=true``
and ``AMLLM_SYNC_DEBUG=count``: the syncs DeepSpeed makes itself on the quiet steps are counted
(amllm/debug.py, DEEPSPEED_SYNCS) and printed by the run at its end (ours too: on the CPU the C++
kernels read CPU tensors, no sync on a GPU; tests/test_gpu_path.py proves the accelerator path free). Step time
is the median over the logged intervals after the first (which holds start-up). One table; the ratio
column is each config's step time over the same stage with overlap_comm off, measured in this one run
(these machines are noisy: compare within a run, never across). On a GPU (``--device cuda``) the syncs
are real stalls; on the CPU DeepSpeed's synchronize is a no-op, so the CPU ratio shows the cost of the
overlap machinery, not of the stalls. docs/parallel.md quotes the counts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from amllm.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent

# (name, shipped config, overrides of its zero_optimization block)
CASES = [
    ("zero1", "zero1_fp32.json", {}),
    ("zero2 overlap_comm=false", "zero2_fp32.json", {"overlap_comm": False}),
    ("zero2 overlap_comm=true (shipped)", "zero2_fp32.json", {"overlap_comm": True}),
    ("zero3 overlap_comm=false", "zero3_fp32.json", {"overlap_comm": False}),
    ("zero3 overlap_comm=true (shipped)", "zero3_fp32.json", {"overlap_comm": True}),
    ("zero2 + CPU offload (fp32)", "zero2_offload_bf16.json", {"bf16": False}),
]
REPORT = re.compile(r"DeepSpeed's own host syncs in quiet steps \(not ours; docs/parallel.md\): (\d+) -- (.*)")


def config_file(tmp: Path, name: str, shipped: str, overrides: dict) -> Path:
    cfg = json.loads((ROOT / "configs" / "deepspeed" / shipped).read_text())
    if overrides.pop("bf16", True) is False:
        cfg["bf16"] = {"enabled": False}
    cfg["zero_optimization"].update(overrides)
    path = tmp / (re.sub(r"[^a-z0-9]+", "_", name) + ".json")
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_case(tmp: Path, name: str, ds_json: Path, steps: int, log_every: int, ranks: int, device: str) -> dict:
    run_dir = tmp / ds_json.stem
    launcher = [sys.executable, "train.py"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "train.py"]
    cmd = [*launcher, "model.name=tiny", "train.precision=fp32", "train.batch_size=8", "train.micro_batch_size=8", f"train.device={device}", f"train.max_steps={steps}",
           f"log.every={log_every}", f"train.check_every={log_every}", "train.sync_debug=true", "eval.every=0",
           "checkpoint.every=0", "log.progress=false", "parallel.backend=deepspeed",
           f"parallel.deepspeed_config={ds_json}", f"run_dir={run_dir}"]
    # count, don't refuse: on the CPU the C++ kernels read CPU tensors, which would be no sync on a GPU run
    env = {**os.environ, "AMLLM_SYNC_DEBUG": "count", "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
        return {"name": name, "error": f"exit {out.returncode}: {tail[0][:160]}"}
    train = read_metrics(run_dir, "train")
    tokens_per_step = train[0]["tokens"] / train[0]["step"]
    ms = statistics.median(1e3 * tokens_per_step / r["tokens_per_s"] for r in train[1:])
    # quiet steps: neither logged nor checked, from the third on (train.py checks the first two)
    quiet = sum(1 for s in range(3, steps + 1) if s % log_every)
    m = REPORT.search(text)
    total, top = (int(m.group(1)), m.group(2)) if m else (0, "")
    return {"name": name, "ms": ms, "syncs_per_step": total / quiet, "where": top}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--log-every", type=int, default=6)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.steps < 2 * args.log_every:
        ap.error("--steps must be at least twice --log-every (the first interval holds start-up)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ds_syncs_") as tmp:
        for name, shipped, over in CASES:
            ds_json = config_file(Path(tmp), name, shipped, dict(over))
            rows.append(run_case(Path(tmp), name, ds_json, args.steps, args.log_every, args.ranks, args.device))
            done = rows[-1].get("error") or "%.1f ms/step" % rows[-1]["ms"]
            print(f"  {name}: {done}", file=sys.stderr, flush=True)
    base = {r["name"].split()[0]: r["ms"] for r in rows if "overlap_comm=false" in r["name"] and "ms" in r}
    print(f"DeepSpeed host syncs per quiet step, {args.ranks} rank(s) on {args.device}, tiny fp32, "
          f"{args.steps} steps (log every {args.log_every})")
    print(f"{'config':36s} {'ms/step':>8s} {'vs off':>7s} {'syncs/step':>10s}  where (most frequent)")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:36s} {r['error']}")
            continue
        ref = base.get(r["name"].split()[0]) if "overlap_comm=true" in r["name"] else None
        ratio = f"{r['ms'] / ref:.2f}x" if ref else "-"
        print(f"{r['name']:36s} {r['ms']:8.1f} {ratio:>7s} {r['syncs_per_step']:10.1f}  {r['where']}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
