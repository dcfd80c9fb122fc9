#!/usr/bin/env bash
# Issue 19 on fold 0's VALIDATION images (test folds not read): the unboxed pool (0 / 100 %), the method
# against Li et al. 2018, a plain BCE classifier as the AUROC reference, image_bce, and backbones started
# from supervised (BCE) and self-supervised (cxrloc pretrain) weights. docs/results.md, "Learning what
# findings look like". Unary stage, cpu preset, 128 px, seed 0, val_seed 0.
#
# Usage: bash experiments/findings_fold0.sh OUT_DIR   (about 4 hours of one core; run pieces in parallel)
set -euo pipefail
OUT=${1:-runs/x}          # run from the repository root
S=$(realpath "${SHARED:-../shared/data}")
E=$(realpath experiments)
mkdir -p "$OUT"; cd "$OUT"
export OMP_NUM_THREADS=1
cxrloc prepare "$S/nih" --images "$S/nih-unboxed/images" --out p128_u100 --size 128 --folds 5 --seed 0 --unannotated-fraction 1
cxrloc prepare "$S/nih" --out p128_u0 --size 128 --folds 5 --seed 0 --unannotated-fraction 0
T="--fold 0 --preset cpu --stage unary --set seed=0 --set val_seed=0 --quiet"
LI="--set loss=li2018 --set crf=false --set antialias=false --set position_bias=false"
cxrloc train p128_u0 --out m_u0_s0 $T
cxrloc train p128_u100 --out m_u100_s0 $T
cxrloc train p128_u0 --out li_u0_s0 $T $LI
cxrloc train p128_u100 --out li_u100_s0 $T $LI
cxrloc train p128_u100 --out mbce1_u100_s0 $T --set image_bce=1
python $E/bce_reference.py p128_u100 --fold 0 --out bce_u100_s0 --epochs 16 --bf16
cxrloc train p128_u100 --out minitbce_u100_s0 $T --set init=bce_u100_s0/backbone.pt
cxrloc train p128_u100 --out minitbce_ibce1_u100_s0 $T --set init=bce_u100_s0/backbone.pt --set image_bce=1
cxrloc pretrain "$S/cxr-pretrain" "$S/nih-unboxed/images" --out ssl30.pt --epochs 15
cxrloc train p128_u100 --out minitssl_u100_s0 $T --set init=ssl30.pt
python $E/bce_reference.py p128_u100 --fold 0 --out bcessl_u100_s0 --epochs 16 --bf16 --init ssl30.pt
cxrloc train p128_u100 --out minitsslbce_u100_s0 $T --set init=bcessl_u100_s0/backbone.pt
# Scores on fold 0's validation images: AUROC of 1'z (all 193 validation images), IoU beside both priors.
for r in m_u0_s0 m_u100_s0 li_u0_s0 li_u100_s0 mbce1_u100_s0 minitbce_u100_s0 minitbce_ibce1_u100_s0 \
         minitssl_u100_s0 minitsslbce_u100_s0; do
  python $E/bce_reference.py p128_u100 --fold 0 --score-run "$r"
done
python $E/val_scores.py m_u0_s0 m_u100_s0 li_u0_s0 li_u100_s0 mbce1_u100_s0 minitbce_u100_s0 \
  minitbce_ibce1_u100_s0 minitssl_u100_s0 minitsslbce_u100_s0 --folds 0
