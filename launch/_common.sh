# Sourced by the launchers in launch/: `--dry-run` as the first argument prints the commands
# instead of running them (tests/test_launch.py checks them that way), and input checks that stop
# with one line and exit status 2.
DRY_RUN=""
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
ARGS=("$@")

# show CMD...: print it shell-quoted (what --dry-run prints)
show() { printf '%q ' "$@" | sed 's/ $//'; }

# launch CMD...: become it (exec: a SIGTERM to this script reaches it), or print it under --dry-run
launch() {
  if [[ -n "$DRY_RUN" ]]; then show "$@"; echo; exit 0; fi
  exec "$@"
}

# die MESSAGE: one line on stderr, exit 2 (a bad input)
die() { echo "error: $*" >&2; exit 2; }

# need_int NAME VALUE [MIN]: VALUE must be an integer >= MIN (default 0)
need_int() {
  [[ "$2" =~ ^[0-9]+$ && "$2" -ge "${3:-0}" ]] || die "$1=$2 must be an integer >= ${3:-0}"
}

# gpus_here: this machine's GPU count (at least 1: a CPU machine runs 1 process)
gpus_here() { python -c 'import torch; print(max(1, torch.cuda.device_count()))'; }

# carry_env: NAME=VALUE lines of the variables a remote host needs that DeepSpeed's runner does not
# forward itself (it forwards PYTHON* and NCCL*). Values DeepSpeed cannot quote (", $, `, newline)
# are left out: it wraps values in double quotes on the remote command line.
carry_env() {
  local name
  for name in $(compgen -e | grep -E '^(HF_|HUGGINGFACE_|TRANSFORMERS_|TOKENIZERS_|TORCH_|TRITON_|OMP_|MKL_|GLOO_|WANDB_|AMLLM_)|^LD_LIBRARY_PATH$'); do
    [[ "${!name}" == *[\"\$\`$'\n']* ]] || printf '%s=%s\n' "$name" "${!name}"
  done
}
