#!/usr/bin/env bash
# Issue 19, part 1: the paper's premise on real data. The full method (`--preset cpu`, the README's
# recipe) and Li et al. 2018 (li2018 loss, no CRF / anti-aliasing / position bias), each with 0 %, 50 %
# and 100 % of the 1,475 unboxed NIH images as unannotated training images, 5 patient-grouped folds
# (the same folds in all three prepared folders, checked by experiments/pool_table.py), training seeds
# 0 and 1 (val_seed=0 everywhere: every run of a fold has the same boxed validation images).
#
# Two tables: the UNARY stage (16 epochs; li2018 has only this stage) for every cell, and the full
# recipe (`--stage all`: unary, CRF, joint) where it has been run. A unary piece trains RUN/unary/fold_K,
# the layout `--stage all` writes, so `--stage all --resume` can later add the CRF and joint stages.
#
# Resumable: every (run, stage, fold) is one piece; a finished piece is skipped (marker in
# OUT/pieces/), an interrupted one continues with --resume. Run it again with the same OUT_DIR to go on.
# Pieces are ordered so that the most informative cells finish first.
#
# Usage: bash experiments/pool_table.sh OUT_DIR QUEUE   (QUEUE a or b: two queues, one core each;
#        c: everything on one core, the unary table first; d: seed 1 at 50 % and 0 % (unary);
#        queues may run together, a piece at a time)
#        python experiments/pool_table.py OUT_DIR        (the tables from whatever has finished)
set -euo pipefail
OUT=${1:-runs/pool}
QUEUE=${2:-a}
S=$(realpath "${SHARED:-../shared/data}")
export OMP_NUM_THREADS=1
mkdir -p "$OUT/pieces"

prep() {  # the folds depend on every usable image, not on the fraction sampled
  local frac=$1 name=$2
  [ -f "$OUT/$name/splits.json" ] && return 0
  cxrloc prepare "$S/nih" --images "$S/nih-unboxed/images" --out "$OUT/$name" --size 128 --folds 5 \
    --seed 0 --unannotated-fraction "$frac"
}

piece() {  # piece NAME STAGE PREPARED FOLD ARGS...: one fold of one run, skipped when done
  local name=$1 stage=$2 prepared=$3 fold=$4; shift 4
  local marker="$OUT/pieces/${name}_${stage}_fold$fold" out="$OUT/$name" resume=""
  [ -f "$marker" ] && return 0
  exec 9>"$marker.lock"                      # two queues never train the same piece at once
  flock -n 9 || { echo "$(date -u +%FT%TZ) skip  $name $stage fold $fold (another queue has it)"; return 0; }
  [ -f "$marker" ] && { exec 9>&-; return 0; }  # finished by another queue between the check and the lock
  [ "$stage" = unary ] && out="$OUT/$name/unary"
  if [ -e "$out/fold_$fold/config.json" ] || [ -e "$out/unary/fold_$fold/config.json" ]; then resume="--resume"; fi
  echo "$(date -u +%FT%TZ) start $name $stage fold $fold $resume"
  cxrloc train "$OUT/$prepared" --out "$out" --fold "$fold" --quiet --stage "$stage" $resume \
    --preset cpu --set val_seed=0 "$@"
  touch "$marker"; exec 9>&-; rm -f "$marker.lock"
  echo "$(date -u +%FT%TZ) done  $name $stage fold $fold"
}

LI="--set loss=li2018 --set crf=false --set antialias=false --set position_bias=false"
run() {  # run NAME STAGE PREPARED SEED METHOD: all five folds
  local name=$1 stage=$2 prepared=$3 seed=$4 method=$5
  for f in 0 1 2 3 4; do
    if [ "$method" = m ]; then piece "$name" "$stage" "$prepared" "$f" --set seed="$seed"
    else piece "$name" "$stage" "$prepared" "$f" --set seed="$seed" $LI; fi
  done
}

prep 0 u0; prep 1 u100; prep 0.5 u50
[ "$QUEUE" = prep ] && exit 0  # only the three prepared folders
if [ "$QUEUE" = a ]; then
  run m_u0_s0 all u0 0 m; run li_u0_s0 unary u0 0 li; run m_u100_s0 unary u100 0 m
  run li_u50_s0 unary u50 0 li; run m_u50_s0 unary u50 0 m; run m_u100_s0 all u100 0 m
elif [ "$QUEUE" = b ]; then
  run m_u0_s1 all u0 1 m; run li_u100_s0 unary u100 0 li; run m_u100_s1 unary u100 1 m
  run li_u0_s1 unary u0 1 li; run li_u100_s1 unary u100 1 li; run m_u50_s1 unary u50 1 m
  run li_u50_s1 unary u50 1 li; run m_u100_s1 all u100 1 m
elif [ "$QUEUE" = c ]; then  # one core: what a and b have left, the 2-seed unary table first
  run m_u100_s1 unary u100 1 m; run li_u0_s1 unary u0 1 li; run li_u100_s1 unary u100 1 li
  run li_u50_s0 unary u50 0 li; run m_u50_s0 unary u50 0 m; run li_u50_s1 unary u50 1 li
  run m_u50_s1 unary u50 1 m; run m_u100_s0 all u100 0 m; run m_u100_s1 all u100 1 m
elif [ "$QUEUE" = d ]; then  # the second seed at 50 %, then its 0 % partners (2026-12-07: the runs
  # folder of 12-06 did not survive; its pieces' values are in docs/results_pool_pieces.json)
  run li_u50_s1 unary u50 1 li; run m_u50_s1 unary u50 1 m; run li_u0_s1 unary u0 1 li
  run m_u0_s1 unary u0 1 m
else
  echo "QUEUE must be a, b, c or d, got $QUEUE" >&2; exit 2
fi
