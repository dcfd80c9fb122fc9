#!/usr/bin/env bash
# Issue 19, part 1: the paper's premise on real data. The full method (`--preset cpu --stage all`, the
# README's recipe) and Li et al. 2018 (`--stage unary`, li2018 loss, no CRF / anti-aliasing / position
# bias), each with 0 %, 50 % and 100 % of the 1,475 unboxed NIH images as unannotated training images,
# 5 patient-grouped folds (the same folds in all three prepared folders), training seeds 0 and 1
# (val_seed=0 everywhere, so every run of a fold has the same validation images).
#
# Resumable: every (run, fold) is one piece; a finished piece is skipped, an interrupted one continues
# with --resume. Run it again with the same OUT_DIR to go on. Pieces are ordered so that the most
# informative cells finish first (0 % and 100 % for seed 0, then seed 1, then 50 %).
#
# Usage: bash experiments/pool_table.sh OUT_DIR QUEUE   (QUEUE a or b: two queues, one core each)
#        python experiments/pool_table.py OUT_DIR        (the table from whatever has finished)
set -euo pipefail
OUT=${1:-runs/pool}
QUEUE=${2:-a}
S=$(realpath "${SHARED:-../shared/data}")
export OMP_NUM_THREADS=1
mkdir -p "$OUT/done"

prep() {  # prepared folders: the folds depend on every usable image, not on the fraction sampled
  local frac=$1 name=$2
  [ -f "$OUT/$name/splits.json" ] && return 0
  cxrloc prepare "$S/nih" --images "$S/nih-unboxed/images" --out "$OUT/$name" --size 128 --folds 5 \
    --seed 0 --unannotated-fraction "$frac"
}

piece() {  # piece NAME PREPARED FOLD ARGS...: one fold of one run, skipped when done
  local name=$1 prepared=$2 fold=$3; shift 3
  local marker="$OUT/done/${name}_fold$fold"
  [ -f "$marker" ] && return 0
  local resume=""
  if compgen -G "$OUT/$name/*fold_$fold" > /dev/null || compgen -G "$OUT/$name/*/fold_$fold" > /dev/null; then
    resume="--resume"
  fi
  echo "$(date -u +%FT%TZ) start $name fold $fold $resume"
  cxrloc train "$OUT/$prepared" --out "$OUT/$name" --fold "$fold" --quiet $resume "$@"
  touch "$marker"
  echo "$(date -u +%FT%TZ) done  $name fold $fold"
}

M="--preset cpu --stage all --set val_seed=0"
L="--preset cpu --stage unary --set val_seed=0 --set loss=li2018 --set crf=false --set antialias=false
   --set position_bias=false"

run() {  # run NAME PREPARED SEED METHOD: all five folds
  local name=$1 prepared=$2 seed=$3 method=$4
  for f in 0 1 2 3 4; do
    if [ "$method" = m ]; then piece "$name" "$prepared" "$f" $M --set seed="$seed"
    else piece "$name" "$prepared" "$f" $L --set seed="$seed"; fi
  done
}

prep 0 u0; prep 1 u100; prep 0.5 u50
if [ "$QUEUE" = a ]; then
  run m_u0_s0 u0 0 m; run li_u0_s0 u0 0 li; run li_u100_s0 u100 0 li; run m_u50_s0 u50 0 m
  run li_u0_s1 u0 1 li; run li_u100_s1 u100 1 li; run li_u50_s0 u50 0 li; run li_u50_s1 u50 1 li
elif [ "$QUEUE" = b ]; then
  run m_u0_s1 u0 1 m; run m_u100_s0 u100 0 m; run m_u100_s1 u100 1 m; run m_u50_s1 u50 1 m
else
  echo "QUEUE must be a or b, got $QUEUE" >&2; exit 2
fi
