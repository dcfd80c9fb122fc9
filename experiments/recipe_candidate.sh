#!/usr/bin/env bash
# Issue 19, part 3: the candidate recipe of fold 0's validation images ("Learning what findings look
# like" in docs/results.md), carried to 5 folds and 2 seeds: a plain BCE classifier trained on each
# fold's training labels (boxed + the unboxed pool, the fold's validation patients left out, as
# `cxrloc train` leaves them out) gives the backbone that the method starts from (`--set init=`), with
# `--set image_bce=1`, through all three stages. Compare with pool_table.sh's `m_u100_s*` (the same
# data, from scratch): AUROC with `python experiments/bce_reference.py OUT/u100 --fold F --score-run
# RUN/joint`, localization with `python experiments/val_scores.py`, on VALIDATION images only; the
# test folds with `experiments/pool_table.py`'s evaluation once the rule is fixed.
#
# Resumable pieces like pool_table.sh (markers in OUT/pieces/). It shares OUT with pool_table.sh (the
# prepared folder u100).
#
# Usage: bash experiments/recipe_candidate.sh OUT_DIR SEED   (one core; about 25 minutes per fold)
set -euo pipefail
OUT=${1:-runs/pool}
SEED=${2:-0}
E=$(realpath "$(dirname "$0")")
export OMP_NUM_THREADS=1
mkdir -p "$OUT/pieces"
[ -f "$OUT/u100/splits.json" ] || { echo "run experiments/pool_table.sh $OUT a first (it prepares $OUT/u100)" >&2; exit 2; }

for f in 0 1 2 3 4; do
  bce="$OUT/bce_s$SEED/fold_$f"
  marker="$OUT/pieces/bce_s${SEED}_fold$f"
  if [ ! -f "$marker" ]; then
    echo "$(date -u +%FT%TZ) start BCE backbone seed $SEED fold $f"
    python "$E/bce_reference.py" "$OUT/u100" --fold "$f" --out "$bce" --epochs 16 --bf16 --seed "$SEED" --val-seed 0
    touch "$marker"
  fi
  marker="$OUT/pieces/cand_s${SEED}_all_fold$f"
  if [ ! -f "$marker" ]; then
    resume=""; [ -e "$OUT/cand_s$SEED/unary/fold_$f/config.json" ] && resume="--resume"
    echo "$(date -u +%FT%TZ) start candidate seed $SEED fold $f $resume"
    cxrloc train "$OUT/u100" --out "$OUT/cand_s$SEED" --fold "$f" --quiet --stage all $resume --preset cpu \
      --set val_seed=0 --set seed="$SEED" --set init="$(realpath "$bce")/backbone.pt" --set image_bce=1
    touch "$marker"
  fi
done
