#!/usr/bin/env bash
# Issue 9's protocol on the 704 boxed NIH images of ../shared/data/nih: every setting chosen on the
# validation images carved out of each fold's training patients, the test folds read once at the end.
#
#   1. prepare (128 px, 5 patient-grouped folds, seed 0);
#   2. for training seeds 0 and 1 (both with val_seed=0, so they share validation images): the full
#      method (unary -> CRF -> joint fine-tune, `cpu` preset) and Li et al. 2018;
#   3. the choices, on VALIDATION images only (`evaluate --split val`, `experiments/val_scores.py`):
#      test-time augmentation, 30 epochs, the ensemble of the two seeds;
#   4. calibration (probabilities, operating points) on validation images;
#   5. the test folds: every run, the ensemble, both priors; tables in docs/results_issue9_tables.md.
#
# Usage: bash experiments/nih_seeds.sh OUT_DIR   (about 8 hours on a 2-core VM; three queues)
set -euo pipefail
OUT=${1:-runs/seeds}
NIH=${NIH:-../shared/data/nih}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
cxrloc prepare "$NIH" --out "$OUT/prep128" --size 128 --folds 5 --seed 0 --unannotated-fraction 0
P="$OUT/prep128"
T="--fold all --preset cpu --quiet --set val_seed=0"

full() {  # the full method with training seed $1
  cxrloc train "$P" --out "$OUT/base_s$1" $T --set seed="$1"
  cxrloc train "$P" --out "$OUT/crf_s$1" $T --set seed="$1" --stage crf --from "$OUT/base_s$1" --epochs 5
  cxrloc train "$P" --out "$OUT/joint_s$1" $T --set seed="$1" --stage joint --from "$OUT/crf_s$1" --epochs 5
}
li() {  # Li et al. 2018 (li2018 loss, no CRF, no anti-aliasing, no position bias) with training seed $1
  cxrloc train "$P" --out "$OUT/li_s$1" $T --set seed="$1" --set loss=li2018 --set crf=false \
    --set antialias=false --set position_bias=false
}
ep30() {  # seed 0's unary runs continued to 30 epochs (the same learning-rate schedule, extended)
  for f in 0 1 2 3 4; do
    [ -d "$OUT/ep30_s0/fold_$f" ] || { mkdir -p "$OUT/ep30_s0"; cp -r "$OUT/base_s0/fold_$f" "$OUT/ep30_s0/"; }
    cxrloc train "$P" --out "$OUT/ep30_s0" --fold "$f" --resume --epochs 30 --quiet
  done
  cxrloc train "$P" --out "$OUT/ep30crf_s0" $T --set seed=0 --stage crf --from "$OUT/ep30_s0" --epochs 5
  cxrloc train "$P" --out "$OUT/ep30joint_s0" $T --set seed=0 --stage joint --from "$OUT/ep30crf_s0" --epochs 5
}
(full 0; ep30) > "$OUT/queue_a.log" 2>&1 &
(full 1) > "$OUT/queue_b.log" 2>&1 &
(li 0; li 1) > "$OUT/queue_c.log" 2>&1 &
wait

cxrloc ensemble "$OUT/joint_s0" "$OUT/joint_s1" --out "$OUT/ens_joint"

# Choices, on validation images only.
python experiments/val_scores.py "$OUT"/base_s0 "$OUT"/base_s1 "$OUT"/crf_s0 "$OUT"/crf_s1 "$OUT"/joint_s0 \
  "$OUT"/ep30_s0 "$OUT"/li_s0 "$OUT"/li_s1 --json "$OUT/val_single.json" | tee "$OUT/val_single.txt"
python experiments/val_scores.py "$OUT"/joint_s1 | tee "$OUT/val_joint_s1.txt"
python experiments/val_scores.py "$OUT"/base_s0 --tta 3 | tee "$OUT/val_tta3.txt"
python experiments/val_scores.py "$OUT"/base_s0 --tta 5 | tee "$OUT/val_tta5.txt"
python experiments/val_scores.py "$OUT"/joint_s0 "$OUT"/joint_s1 --ensemble | tee "$OUT/val_ens.txt"
python experiments/val_scores.py "$OUT"/base_s0 "$OUT"/base_s1 --ensemble | tee "$OUT/val_ens_unary.txt"
python experiments/val_scores.py "$OUT"/ep30joint_s0 | tee "$OUT/val_ep30joint.txt"

# The test folds, once.
for run in base_s0 base_s1 crf_s0 crf_s1 joint_s0 joint_s1 li_s0 li_s1 ens_joint; do
  cxrloc calibrate "$OUT/$run" --fold all
  cxrloc evaluate "$OUT/$run" --metric both --fold all
done
python experiments/seed_table.py "$OUT" --group "full, 2-seed ensemble=ens_joint" \
  --group "full (mean of 2 seeds)=joint_s0,joint_s1" --group "full, no joint fine-tune=crf_s0,crf_s1" \
  --group "unary only=base_s0,base_s1" --group "Li et al. 2018=li_s0,li_s1" \
  --ref "full, 2-seed ensemble" --out docs/results_issue9_tables.md
