#!/usr/bin/env bash
# Launches train_gpt2.py under torchrun; run_dense.sh and run_moe.sh call it with their flags.
#   one process per visible GPU, one CPU process when there is none; NPROC=n overrides
#   multi-node: NNODES=n RDZV_ENDPOINT=host:port on every node (see README)
#   --smoke anywhere in the arguments: generate a small synthetic language and train a tiny model on it
#   (flags/tiny.txt); @FILE reads flags from a file (flags/*.txt)
#   SCRIPT=path: another copy of the trainer (tools/ab.py runs a git ref's); CHECK_ONLY=1: check, don't train
# Every other argument passes through to the trainer; later flags win over earlier ones.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
SCRIPT=${SCRIPT:-train_gpt2.py}

args=() smoke=0
for a in "$@"; do
  if [[ "$a" == "--smoke" ]]; then smoke=1; else args+=("$a"); fi
done
if (( smoke )); then
  if [[ ! -d data/smoke ]]; then  # written aside and moved into place whole: two launches at once both see it whole
    tmp=$(mktemp -d data/smoke.XXXXXX)
    "$PYTHON" data/synthetic.py --out "$tmp" --vocab_size 512 > /dev/null
    mv -T "$tmp" data/smoke 2>/dev/null || rm -rf "$tmp"
  fi
  smoke_flags=(@flags/tiny.txt --input_bin 'data/smoke/synthetic_train_*.bin'
    --input_val_bin 'data/smoke/synthetic_val_*.bin' --num_iterations 200 --warmdown_iters 60
    --val_loss_every 50 --val_tokens 16384)
  args=("${smoke_flags[@]}" ${args[@]+"${args[@]}"})
fi

NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
NNODES=${NNODES:-1}
if (( NNODES > 1 )); then
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (the same on every node) for a multi-node run}"
  launch=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-modded-nanogpt-moe}")
else
  launch=(--standalone)
fi

# check the flags and the data first, so a typo costs one line and no launch
WORLD_SIZE=$((NNODES * NPROC)) "$PYTHON" "$SCRIPT" --check_only ${args[@]+"${args[@]}"} >/dev/null
[[ -z "${CHECK_ONLY:-}" ]] || exit 0
# torchrun treats SIGTERM and SIGINT as fatal to itself and exits non-zero even when its workers stop
# cleanly. So it runs in a session of its own (a terminal's Ctrl-C does not reach it) and this script hands
# the signal to the workers, which agree, checkpoint at the next step boundary and exit 0. torchrun is
# started as a module of $PYTHON, so it need not be on PATH.
setsid "$PYTHON" -m torch.distributed.run "${launch[@]}" --nproc_per_node="$NPROC" "$SCRIPT" \
  ${args[@]+"${args[@]}"} &
launcher=$!
forward() {  # signal $1 to the launcher's children (the workers), found in /proc: no pkill (procps) needed
  local stat line fields
  for stat in /proc/[0-9]*/stat; do
    line=$(<"$stat") 2>/dev/null || continue
    fields=(${line##*) })  # after "pid (command name)": state, ppid, ...
    [[ ${fields[1]} == "$launcher" ]] && kill -"$1" "${stat//[!0-9]/}" 2>/dev/null
  done
  return 0
}
trap 'forward TERM' TERM
trap 'forward INT' INT
while true; do
  status=0
  wait "$launcher" || status=$?
  kill -0 "$launcher" 2>/dev/null || exit "$status"  # else a trapped signal interrupted the wait
done
