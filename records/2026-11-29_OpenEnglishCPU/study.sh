#!/usr/bin/env bash
# The study of this folder, run one configuration after another on an otherwise idle machine:
#   records/2026-11-29_OpenEnglishCPU/study.sh dense          # phase 1: dense at five output scales
#   records/2026-11-29_OpenEnglishCPU/study.sh dense 0.003    # ... and another scale
#   records/2026-11-29_OpenEnglishCPU/study.sh moe 0.3        # phase 2: the MoE designs at 1 and at the best dense scale
# Needs the corpus: python data/open_english.py (data/open_english/, vocabulary 4096). Each finished run's log
# is copied here; a run whose log is already here is skipped, so the study can be stopped and started again.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=records/2026-11-29_OpenEnglishCPU
WORK=${WORK:-/tmp/open_english_study}
COMMON=(--input_bin 'data/open_english/open_english_train_*.bin' --input_val_bin 'data/open_english/open_english_val_*.bin'
  --vocab_size 4096 --n_layer 4 --n_head 4 --n_embd 128 --sequence_length 256 --device_batch_size 16 --batch_size 16
  --num_iterations 250 --warmdown_iters 72 --val_loss_every 125 --val_tokens 131072)
SEEDS=(1 2 3)

run() {  # run NAME SEED SCRIPT FLAGS...: one training run, its log copied into this folder as NAME_seedSEED.txt
  local name=$1 seed=$2 script=$3; shift 3
  [[ -f "$HERE/${name}_seed${seed}.txt" ]] && return 0
  rm -rf "$WORK/$name/$seed"
  NPROC=1 "./$script" "${COMMON[@]}" --seed "$seed" --log_dir "$WORK/$name/$seed" "$@" > /dev/null
  cp "$WORK/$name/$seed"/*.txt "$HERE/${name}_seed${seed}.txt"
  echo "$name seed $seed: $(grep -h 'val_loss' "$HERE/${name}_seed${seed}.txt" | tail -1)"
}

case "${1:-}" in
  dense)  # study.sh dense [SCALES...]: the five of the issue by default, and any others asked for
    shift
    scales=("$@")
    (( ${#scales[@]} )) || scales=(1 0.3 0.1 0.03 0.01)
    for scale in "${scales[@]}"; do
      for seed in "${SEEDS[@]}"; do run "dense_scale$scale" "$seed" run_dense.sh --mlp_output_scale "$scale"; done
    done ;;
  moe)
    best=${2:?give the best dense --mlp_output_scale, e.g. study.sh moe 0.3}
    for scale in 1 "$best"; do
      for seed in "${SEEDS[@]}"; do
        run "moe_seed_scale$scale" "$seed" run_moe.sh --mlp_output_scale "$scale"
        run "moe_st_scale$scale" "$seed" run_moe.sh --router_gate st --mlp_output_scale "$scale"
        run "moe_E16top4_scale$scale" "$seed" run_moe.sh --num_experts 16 --top_k 4 --expert_hidden 128 \
          --mlp_output_scale "$scale"
        run "moe_E16top3S128_scale$scale" "$seed" run_moe.sh --num_experts 16 --top_k 3 --expert_hidden 128 \
          --shared_expert_hidden 128 --mlp_output_scale "$scale"
      done
    done
    for seed in "${SEEDS[@]}"; do run moe_null10 "$seed" run_moe.sh --null_expert_bias 10; done ;;
  *) echo "usage: $0 dense | moe BEST_DENSE_SCALE" >&2; exit 2 ;;
esac
