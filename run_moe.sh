#!/usr/bin/env bash
# The seed's MoE: every MLP becomes 4 experts of the dense MLP's shape (same active parameters), top-1,
# a learned router with the renormalised gate, the Switch balance loss at 0.01, no null-expert bias.
# Extra arguments pass through and win (./run_moe.sh --smoke, ./run_moe.sh --null_expert_bias 10).
exec "$(dirname "$0")/run.sh" --num_experts 4 --top_k 1 --router learned --router_gate renorm \
  --aux_loss_coef 0.01 --null_expert_bias 0 "$@"
