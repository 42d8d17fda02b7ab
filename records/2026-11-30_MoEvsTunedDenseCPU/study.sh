#!/usr/bin/env bash
# The study of this folder, in the order of its README (each phase is resumable: rerun the same line).
#   study.sh tune 0.01            # phase 1: dense and the MoE at one --mlp_output_scale, tuning seeds 101, 102
#   study.sh confirm S_DENSE S_MOE        # phase 2: 6 fresh matched pairs (seeds 1..6) at the chosen scales
#   study.sh equal_time S_DENSE S_MOE R   # phase 3: dense trained R x the steps (R: the step_avg ratio), same pairs
#   study.sh init_only                    # beside: dense at 0.01, seeds 101..103 with the record's data order
# Needs the corpus: python data/open_english.py. OMP_NUM_THREADS=1 per run (one core a run).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=records/2026-11-30_MoEvsTunedDenseCPU
STEPS=500 WARMDOWN=144
COMMON=(--input_bin 'data/open_english/open_english_train_*.bin' --input_val_bin 'data/open_english/open_english_val_*.bin'
  --vocab_size 4096 --n_layer 4 --n_head 4 --n_embd 128 --sequence_length 256 --device_batch_size 16 --batch_size 16
  --val_loss_every 250 --val_tokens 131072)
MOE="--num_experts 16 --top_k 3 --expert_hidden 128 --shared_expert_hidden 128 --aux_loss_coef 0.01"
export OMP_NUM_THREADS=1
ab() { python tools/ab.py --same_script --nproc 1 --jobs 2 "$@"; }  # two runs at a time, one a core

case "${1:-}" in
  tune)
    s=${2:?give a scale}
    ab --runs 2 --seed_offset 101 --out "$HERE/tune_scale$s" --base_flags "--mlp_output_scale $s" \
      --new_flags "$MOE --mlp_output_scale $s" -- "${COMMON[@]}" --num_iterations $STEPS --warmdown_iters $WARMDOWN ;;
  confirm)
    ab --runs 6 --seed_offset 1 --out "$HERE/confirm" --base_flags "--mlp_output_scale ${2:?}" \
      --new_flags "$MOE --mlp_output_scale ${3:?}" -- "${COMMON[@]}" --num_iterations $STEPS --warmdown_iters $WARMDOWN ;;
  equal_time)
    r=${4:?give the step_avg ratio}
    steps=$(python -c "print(round($STEPS * $r))") warmdown=$(python -c "print(round($WARMDOWN * $r))")
    ab --runs 6 --seed_offset 1 --out "$HERE/equal_time" --reuse "$HERE/confirm" \
      --base_flags "--mlp_output_scale ${2:?} --num_iterations $steps --warmdown_iters $warmdown --val_loss_every $steps" \
      --new_flags "$MOE --mlp_output_scale ${3:?}" -- "${COMMON[@]}" --num_iterations $STEPS --warmdown_iters $WARMDOWN ;;
  init_only)  # the spread that seeds varying only the initialisation show, at this size
    for seed in 101 102 103; do
      grep -ls "'seed': $seed," "$HERE"/init_only/*.txt | xargs -r grep -qs "^step:$STEPS/$STEPS val_loss" && continue
      NPROC=1 ./run_dense.sh "${COMMON[@]}" --num_iterations $STEPS --warmdown_iters $WARMDOWN --mlp_output_scale 0.01 \
        --seed $seed --data_seed 0 --log_dir "$HERE/init_only" > /dev/null
    done ;;
  *) echo "usage: $0 tune SCALE | confirm S_DENSE S_MOE | equal_time S_DENSE S_MOE RATIO | init_only" >&2; exit 2 ;;
esac
