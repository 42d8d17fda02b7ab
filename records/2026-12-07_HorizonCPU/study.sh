#!/usr/bin/env bash
# The runs of this folder's README: study.sh PHASE PAIR... runs one run at a time (one lane, one core).
#   h500check 11    pair 11's dense 500 and 625 and MoE 500: they must equal 2026-12-07_DataOrderCPU's
#   h1000 PAIRS     dense 1000 and 1250, MoE 1000, and dense 1500 where the MoE beats dense 1250 (see the README)
#   h2000 PAIRS     dense 2000 and 2500, MoE 2000, and dense 3000 where the MoE beats dense 2500
#   late PAIRS      dense 1500 for the pairs h1000 left it to (their trunk keeps its checkpoint at 1068), and
#                   dense 3000 for every pair once any pair's MoE at 2000 beats its dense at 2500
# A pair's phases run in that order (a trunk only grows). A finished run is skipped, so a stopped lane resumes
# by running the same line again; `touch PAUSE` here holds every lane before its next run.
# Needs the corpus: python data/open_english.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=records/2026-12-07_HorizonCPU
COMMON=(--input_bin 'data/open_english/open_english_train_*.bin' --input_val_bin 'data/open_english/open_english_val_*.bin'
  --vocab_size 4096 --n_layer 4 --n_head 4 --n_embd 128 --sequence_length 256 --device_batch_size 16 --batch_size 16
  --val_loss_every 0 --mlp_output_scale 0.01)
MOE=(--num_experts 16 --top_k 3 --expert_hidden 128 --shared_expert_hidden 128 --aux_loss_coef 0.01)
export OMP_NUM_THREADS=1

warmdown() { echo $(( (288 * $1 + 500) / 1000 )); }  # round(0.288 L): 144 for 500, 180 for 625
side_flags() { [[ $1 == moe ]] && echo "${MOE[@]}" || true; }
wait_pause() { while [[ -e $HERE/PAUSE ]]; do sleep 15; done; }
final_loss() { grep -h -o "^step:$3/$3 val_loss:[0-9.]*" "$HERE"/runs/"$1"_L"$3"_s"$2"/*.txt | cut -d: -f3; }
moe_beats() { awk -v m="$(final_loss moe "$1" "$2")" -v d="$(final_loss dense "$1" "$3")" 'BEGIN { exit !(m < d) }'; }
trunk_ckpt() { ls "$HERE"/trunks/"$1"_s"$2"/*/state_step"$(printf %06d "$3")".pt 2>/dev/null | head -1; }

extend_trunk() {  # SIDE PAIR K: the side's trunk at constant lr up to step K, with a checkpoint there
  local dir=$HERE/trunks/$1_s$2 prev resume=()
  [[ -n "$(trunk_ckpt "$1" "$2" "$3")" ]] && return
  prev=$(ls "$dir"/*/state_step*.pt 2>/dev/null | sort | tail -1 || true)
  if [[ -n $prev ]]; then
    local step=$((10#$(basename "$prev" .pt | sed 's/state_step//')))
    (( step < $3 )) || { echo "trunk $1_s$2 is at step $step, past $3, with no checkpoint at $3" >&2; exit 1; }
    resume=(--resume "$prev")
  fi
  wait_pause
  echo "$(date +%T) trunk $1 pair $2 to step $3"
  python train_gpt2.py "${COMMON[@]}" $(side_flags "$1") --seed "$2" --data_seed "$2" --num_iterations "$3" \
    --warmdown_iters 0 --val_tokens 4096 --log_dir "$dir" ${resume[@]+"${resume[@]}"} > /dev/null
}

branch() {  # SIDE PAIR L: the run of L steps, from its trunk's checkpoint at L - W(L)
  local W out=$HERE/runs/$1_L$3_s$2
  W=$(warmdown "$3")
  if compgen -G "$out/*.txt" > /dev/null && grep -q "^step:$3/$3 val_loss:" "$out"/*.txt; then return; fi
  extend_trunk "$1" "$2" $(($3 - W))
  wait_pause
  echo "$(date +%T) run $1 pair $2, $3 steps (warmdown $W)"
  rm -rf "$out" && mkdir -p "$out"
  python train_gpt2.py "${COMMON[@]}" $(side_flags "$1") --seed "$2" --data_seed "$2" --num_iterations "$3" \
    --warmdown_iters "$W" --val_tokens 0 --resume "$(trunk_ckpt "$1" "$2" $(($3 - W)))" --log_dir "$out" > /dev/null
}

phase=${1:-}; shift || true
for pair in "$@"; do
  case $phase in
    h500check) branch dense "$pair" 500; branch dense "$pair" 625; branch moe "$pair" 500 ;;
    h1000) branch dense "$pair" 1000; branch moe "$pair" 1000; branch dense "$pair" 1250
           if moe_beats "$pair" 1000 1250; then branch dense "$pair" 1500; else extend_trunk dense "$pair" 1068; fi ;;
    h2000) branch dense "$pair" 2000; branch moe "$pair" 2000; branch dense "$pair" 2500
           if moe_beats "$pair" 2000 2500; then branch dense "$pair" 3000; fi ;;
    late) branch dense "$pair" 1500
          for any in 11 12 13 14; do if moe_beats "$any" 2000 2500; then branch dense "$pair" 3000; break; fi; done ;;
    *) echo "usage: $0 h500check|h1000|h2000|late PAIR..." >&2; exit 2 ;;
  esac
done
