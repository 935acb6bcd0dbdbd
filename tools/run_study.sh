#!/usr/bin/env bash
# The CPU-scale warmup study of docs/study.md, one stage per argument (from the repository root):
#   bash tools/run_study.sh screen    # AdamW only, warmup 0 vs 20 over lrs 1e-3/2e-3/4e-3, seeds 200-202 (18 runs)
#   bash tools/run_study.sh study     # the paper's four arms at lr 2e-3, 180 steps, β2 0.95, seeds 0-9 (40 runs)
#   bash tools/run_study.sh control   # per-tensor and per-block AM-AdamW vs AdamW β1 ∈ {0, .5, .7, .84, .9},
#                                     # no warmup, seeds 100-109 (70 runs)
#   bash tools/run_study.sh tables    # only the tables and figures, from the committed bundles
#   bash tools/run_study.sh beta60    # the earlier 60-step study (lr 1e-2, β2 0.99; docs/study/results.md)
#   bash tools/run_study.sh contrast  # the first lr 1e-3 / 3e-2 study (β pinned at β_max)
# One run at a time (JOBS=2 for two) at ~5-6 min each on a shared 2-core machine. Re-running a stage skips
# finished runs and resumes interrupted ones, so a stage cut short is finished by running it again;
# SEEDS="3 4" limits a stage to those seeds. Runs (and checkpoints) stay under the ignored runs/; each
# stage adds its runs to one compact bundle (docs/study/warmup/<stage>.jsonl, python -m tools.summarize
# --bundle --add: seeds run elsewhere stay in it), and every table and figure is made from the bundles.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
D=docs/study/warmup
sweep() {  # grid out [seeds]
  local seeds=()
  [ -n "${SEEDS:-}" ] && seeds=(--seeds $SEEDS)
  "$PY" -m tools.sweep --grid "$1" --out "$2" --jobs "${JOBS:-1}" "${seeds[@]}" || [ $? = 75 ]
}
screen_tables() {
  local pairs=()
  for lr in 1e-3 2e-3 4e-3; do pairs+=(--pair "adamw-nowarmup-lr$lr:adamw-warmup-lr$lr"); done
  pairs+=(--pair "adamw-warmup-lr1e-3:adamw-warmup-lr2e-3" --pair "adamw-warmup-lr4e-3:adamw-warmup-lr2e-3")
  "$PY" -m tools.summarize $D/screen.jsonl --study "${pairs[@]}" --out $D/screen.md
}
study_tables() {
  "$PY" -m tools.summarize $D/study.jsonl --study --out $D/study.md
  "$PY" -m tools.plot $D/study.jsonl --out $D/figs --smooth 5
}
control_tables() {
  local pairs=()
  for arm in am_adamw-pertensor-nowarmup am_adamw-perblock-nowarmup; do
    for b1 in 0.9 0.84 0.7 0.5 0.0; do pairs+=(--pair "$arm:adamw-beta1_$b1-nowarmup"); done
  done
  pairs+=(--pair "am_adamw-perblock-nowarmup:am_adamw-pertensor-nowarmup")
  for b1 in 0.84 0.7 0.5 0.0; do pairs+=(--pair "adamw-beta1_$b1-nowarmup:adamw-beta1_0.9-nowarmup"); done
  "$PY" -m tools.summarize $D/control.jsonl --study "${pairs[@]}" --out $D/control.md
}
mkdir -p $D
case "${1:-}" in
  screen)
    sweep configs/cpu/study_screen_grid.yaml runs/study_screen
    "$PY" -m tools.summarize runs/study_screen --bundle $D/screen.jsonl --add
    screen_tables ;;
  study)
    O=runs/study_warmup
    sweep configs/cpu/study_warmup_grid.yaml $O
    "$PY" -m tools.summarize "$O/adamw-warmup-s*" "$O/adamw-nowarmup-s*" "$O/am_adamw-warmup-s*" \
        "$O/am_adamw-nowarmup-s*" --bundle $D/study.jsonl --add
    study_tables ;;
  control)
    O=runs/study_warmup
    sweep configs/cpu/study_control_grid.yaml $O
    "$PY" -m tools.summarize "$O/am_adamw-per*-nowarmup-s*" "$O/adamw-beta1_*-nowarmup-s*" --bundle $D/control.jsonl --add
    control_tables ;;
  tables)
    [ -f $D/screen.jsonl ] && screen_tables
    [ -f $D/study.jsonl ] && study_tables
    [ -f $D/control.jsonl ] && control_tables
    true ;;
  beta60)
    OUT=${OUT:-runs/study_beta}
    "$PY" -m tools.sweep --grid configs/cpu/study_beta_grid.yaml --out "$OUT" --jobs "${JOBS:-2}"
    "$PY" -m tools.summarize "$OUT" --bundle docs/study/beta60.jsonl
    "$PY" -m tools.summarize docs/study/beta60.jsonl --study --paper --out docs/study/results.md
    "$PY" -m tools.plot "docs/study/beta60.jsonl#adamw-*" "docs/study/beta60.jsonl#am_adamw-warmup-*" \
        "docs/study/beta60.jsonl#am_adamw-nowarmup-*" --out docs/study/figs/arms --smooth 3
    "$PY" -m tools.plot "docs/study/beta60.jsonl#adamw-nowarmup-*" "docs/study/beta60.jsonl#am_adamw-*nowarmup-*" \
        "docs/study/beta60.jsonl#adamw-beta1*" --out docs/study/figs/variants --smooth 3 ;;
  contrast)
    OUT=${OUT:-runs/study}
    "$PY" -m tools.sweep --grid configs/cpu/study_grid.yaml --out "$OUT" --jobs "${JOBS:-2}"
    C=docs/study/contrast_lr1e-3
    mkdir -p $C
    "$PY" -m tools.summarize "$OUT" --paper --out $C/results.md
    for lr in 1e-3 3e-2; do
      "$PY" -m tools.summarize "$OUT/*-lr$lr-*" --out "$C/results_lr$lr.md"
      "$PY" -m tools.plot "$OUT/*-lr$lr-*" --out "$C/lr$lr" --smooth 10
    done ;;
  *)
    echo "usage: bash tools/run_study.sh screen|study|control|tables|beta60|contrast (see its first lines)" >&2
    exit 2 ;;
esac
