#!/usr/bin/env bash
# The paper's protocol on the 704 annotated NIH images of ../shared/data/nih with the `cpu` preset:
# 5 patient-grouped folds, 0% unannotated, from scratch. Two queues run side by side, one thread each.
# The CRF stage starts from the unary run's weights and the preset's initial thresholds (no fitting
# in between: fit-thresholds' rho_hat = tau_hat / 2 would undo the cpu preset's rho_hat choice).
# Usage: bash experiments/nih_cv.sh OUT_DIR   (about 75 minutes on 2 CPU cores; the plot needs pip install -e ".[plots]")
set -euo pipefail
OUT=${1:-runs/nih}
NIH=${NIH:-../shared/data/nih}
mkdir -p "$OUT"
cxrloc prepare "$NIH" --out "$OUT/prepared" --size 128 --folds 5 --seed 0 --unannotated-fraction 0
P="$OUT/prepared"
T="--fold all --preset cpu --quiet"
export OMP_NUM_THREADS=1

queue_a() {  # the full method (its unary stage is the "no CRF" ablation), then "no anti-aliasing"
  cxrloc train "$P" --out "$OUT/full_unary" $T
  cxrloc train "$P" --out "$OUT/full" $T --stage crf --from "$OUT/full_unary" --epochs 5
  cxrloc train "$P" --out "$OUT/full_joint" $T --stage joint --from "$OUT/full" --epochs 5
  cxrloc train "$P" --out "$OUT/noaa_unary" $T --set antialias=false
  cxrloc train "$P" --out "$OUT/noaa" $T --set antialias=false --stage crf --from "$OUT/noaa_unary" --epochs 5
}
queue_b() {  # Li et al. 2018 (li2018 loss, no CRF, no anti-aliasing), then the sigmoid loss
  cxrloc train "$P" --out "$OUT/li2018" $T --set loss=li2018 --set crf=false --set antialias=false
  cxrloc train "$P" --out "$OUT/sigmoid_unary" $T --set loss=threshold-sigmoid
  cxrloc train "$P" --out "$OUT/sigmoid" $T --set loss=threshold-sigmoid --stage crf --from "$OUT/sigmoid_unary" --epochs 5
  # Li et al. 2018 without the cpu preset's position bias (rho_hat_box_fraction does not apply to li2018)
  cxrloc train "$P" --out "$OUT/li2018_nopb" $T --set loss=li2018 --set crf=false --set antialias=false --set position_bias=false
}
queue_a > "$OUT/queue_a.log" 2>&1 &
queue_b > "$OUT/queue_b.log" 2>&1 &
wait
for run in full full_joint full_unary li2018 li2018_nopb noaa sigmoid; do
  cxrloc calibrate "$OUT/$run" --fold all  # probabilities and operating points on each fold's validation images
  cxrloc evaluate "$OUT/$run" --metric both --fold all --t 0.1 --t 0.2 --t 0.3 --t 0.4 --t 0.5 --t 0.6 --t 0.7
done
python experiments/compile_results.py "$OUT" --out docs/results_nih_tables.md --plot docs/img/nih_acc_vs_t.png \
  --method "full (threshold+CRF+AA)=full" --method "full + joint fine-tune=full_joint" --method "no CRF=full_unary" --method "no anti-aliasing=noaa" \
  --method "sigmoid loss=sigmoid" --method "Li et al. 2018=li2018" --method "Li et al. 2018, no position bias=li2018_nopb" \
  --compare "full (threshold+CRF+AA)" --compare "full + joint fine-tune"

