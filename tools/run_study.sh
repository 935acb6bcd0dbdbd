#!/usr/bin/env bash
# The CPU-scale warmup study of docs/study.md in one command (from the repository root):
#   bash tools/run_study.sh            # 16 runs, 2 at a time, then figures + tables in docs/study/
# Re-running skips finished runs and resumes interrupted ones. JOBS=1 runs one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/study}
"$PY" tools/sweep.py --grid configs/cpu/study_grid.yaml --out "$OUT" --jobs "${JOBS:-2}"
mkdir -p docs/study
"$PY" tools/summarize.py "$OUT" --paper --out docs/study/results.md      # every run
for lr in 1e-3 3e-2; do                                                 # one learning rate at a time
  "$PY" tools/summarize.py "$OUT/*-lr$lr-*" --out "docs/study/results_lr$lr.md"
  "$PY" tools/plot.py "$OUT/*-lr$lr-*" --out "docs/study/lr$lr" --smooth 10
done
