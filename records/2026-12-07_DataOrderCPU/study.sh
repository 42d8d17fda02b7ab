#!/usr/bin/env bash
# The study of this folder, in the order of its README (each phase is resumable: rerun the same line).
#   study.sh per_token     # dense and E16 top-3 + shared, 500 steps each, pairs 11..16 (sampled data order)
#   study.sh equal_time    # dense at 1.25 x 500 = 625 steps, the same pairs (the MoE runs of per_token, reused)
#   study.sh val131k       # every final checkpoint evaluated again on the old study's 131,072 val tokens
# Needs the corpus: python data/open_english.py. OMP_NUM_THREADS=1 per run (one core a run).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=records/2026-12-07_DataOrderCPU
COMMON=(--input_bin 'data/open_english/open_english_train_*.bin' --input_val_bin 'data/open_english/open_english_val_*.bin'
  --vocab_size 4096 --n_layer 4 --n_head 4 --n_embd 128 --sequence_length 256 --device_batch_size 16 --batch_size 16
  --val_loss_every 0 --val_tokens 0 --mlp_output_scale 0.01)
MOE="--num_experts 16 --top_k 3 --expert_hidden 128 --shared_expert_hidden 128 --aux_loss_coef 0.01"
export OMP_NUM_THREADS=1
ab() { python tools/ab.py --same_script --nproc 1 --jobs 2 --runs 6 --seed_offset 11 "$@"; }

case "${1:-}" in
  per_token)
    ab --out "$HERE/per_token" --new_flags "$MOE" -- "${COMMON[@]}" --num_iterations 500 --warmdown_iters 144 ;;
  equal_time)
    ab --out "$HERE/equal_time" --reuse "$HERE/per_token" --base_flags "--num_iterations 625 --warmdown_iters 180" \
      --new_flags "$MOE" -- "${COMMON[@]}" --num_iterations 500 --warmdown_iters 144 ;;
  val131k)  # resuming a finished run at its last step only validates it: the same flags (from ab.json), another val set
    for phase in per_token equal_time; do
      python - "$HERE/$phase" <<'PY' | while read -r log ckpt flags; do
import json, shlex, sys
folder = sys.argv[1]
for e in json.load(open(f"{folder}/ab.json"))["runs"]:
    if e["status"] == 0:
        steps = e["flags"][len(e["flags"]) - 1 - e["flags"][::-1].index("--num_iterations") + 1]
        print(e["log"], f"{folder}/{e['log'][:-4]}/state_step{int(steps):06d}.pt", shlex.join(e["flags"]))
PY
        [ -s "$HERE/val131k/$log" ] && continue
        eval "NPROC=1 ./run.sh $flags --val_tokens 131072 --resume $ckpt --log_dir $HERE/val131k" > /dev/null
      done
    done ;;
  *) echo "usage: $0 per_token | equal_time | val131k" >&2; exit 2 ;;
esac
