#!/usr/bin/env bash
# The seed's MoE, as flags/seed_moe.txt defines it: 4 experts of the dense MLP's shape, top-1, balance loss 0.01.
# Extra arguments pass through and win (./run_moe.sh --smoke, ./run_moe.sh --null_expert_bias 10).
exec "$(dirname "$0")/run.sh" @flags/seed_moe.txt "$@"
