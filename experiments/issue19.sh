#!/usr/bin/env bash
# Issue 19 in one command: every table of docs/results.md "The paper's premise on real data" and "A recipe
# that uses the image-level labels", from nothing but ../shared/data (nih/ and nih-unboxed/).
#
#   1. experiments/pool_table.sh OUT a and OUT b, side by side (one core each): the 0 / 50 / 100 % pool
#      table, both methods, seeds 0 and 1, 5 folds, unary stage and the full recipe;
#   2. experiments/recipe_candidate.sh OUT 0 and OUT 1 (after the queues): the part-3 candidate;
#   3. experiments/candidate_decision.py OUT: the rule, on validation images only;
#   4. experiments/pool_table.py OUT --with-candidate: every finished piece calibrated and evaluated once
#      on its test fold, and the tables written to docs/results_pool_table.md.
#
# Every step is made of resumable pieces (markers in OUT/pieces/): stop it at any time and run the same
# command again to go on. About 40 hours of one core in all on a 2-core x86_64 VM with AVX-512 BF16
# (torch 2.14.1, CPU), so about 20 hours of wall time on two cores.
#
# Usage: bash experiments/issue19.sh [OUT_DIR]   (default runs/pool)
set -euo pipefail
OUT=${1:-runs/pool}
E=$(dirname "$0")
mkdir -p "$OUT"
bash "$E/pool_table.sh" "$OUT" prep
bash "$E/pool_table.sh" "$OUT" a > "$OUT/queue_a.log" 2>&1 &
a=$!
bash "$E/pool_table.sh" "$OUT" b > "$OUT/queue_b.log" 2>&1 &
b=$!
wait "$a"
bash "$E/recipe_candidate.sh" "$OUT" 0 >> "$OUT/cand_s0.log" 2>&1 &
c0=$!
wait "$b"
bash "$E/recipe_candidate.sh" "$OUT" 1 >> "$OUT/cand_s1.log" 2>&1
wait "$c0"
for seed in 0 1; do python "$E/candidate_decision.py" "$OUT" --seed "$seed" --json "$OUT/decision_s$seed.json"; done
python "$E/pool_table.py" "$OUT" --with-candidate --out docs/results_pool_table.md
