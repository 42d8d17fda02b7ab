#!/usr/bin/env bash
# The dense baseline: the 2024-11-03 speedrun record. Extra arguments pass through (./run_dense.sh --smoke).
exec "$(dirname "$0")/run.sh" "$@"
