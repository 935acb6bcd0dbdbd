#!/usr/bin/env bash
# The CPU-scale study of docs/study.md in one command (from the repository root):
#   bash tools/run_study.sh     # 65 runs, 2 at a time (~1 h on a shared 2-core machine), then tables + figures in docs/study/
# The runs (with their final checkpoints) stay under the ignored runs/study_beta; docs/study/runs/ gets
# compact copies of their config and metrics, and every table and figure is made from those copies.
# Re-running skips finished runs and resumes interrupted ones. JOBS=1 runs one at a time.
# The earlier lr 1e-3 / 3e-2 study (β pinned at β_max): bash tools/run_study.sh contrast
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ "${1:-}" = contrast ]; then
  OUT=${OUT:-runs/study}
  "$PY" -m tools.sweep --grid configs/cpu/study_grid.yaml --out "$OUT" --jobs "${JOBS:-2}"
  D=docs/study/contrast_lr1e-3
  mkdir -p $D
  "$PY" -m tools.summarize "$OUT" --paper --out $D/results.md
  for lr in 1e-3 3e-2; do
    "$PY" -m tools.summarize "$OUT/*-lr$lr-*" --out "$D/results_lr$lr.md"
    "$PY" -m tools.plot "$OUT/*-lr$lr-*" --out "$D/lr$lr" --smooth 10
  done
  exit 0
fi
OUT=${OUT:-runs/study_beta}
"$PY" -m tools.sweep --grid configs/cpu/study_beta_grid.yaml --out "$OUT" --jobs "${JOBS:-2}"
D=docs/study
rm -rf $D/runs
"$PY" -m tools.summarize "$OUT" --export $D/runs
"$PY" -m tools.summarize $D/runs --study --paper --out $D/results.md
"$PY" -m tools.plot "$D/runs/adamw-*" "$D/runs/am_adamw-warmup-*" "$D/runs/am_adamw-nowarmup-*" \
    --out $D/figs/arms --smooth 3                                         # the paper's four arms
"$PY" -m tools.plot "$D/runs/adamw-nowarmup-*" "$D/runs/am_adamw-*nowarmup-*" "$D/runs/adamw-beta1*" \
    --out $D/figs/variants --smooth 3                                     # the variants and the control
