#!/usr/bin/env bash
# The GPU check of issue 10, on one CUDA GPU, in under 5 minutes:
#   1. training throughput of the five networks (bare ResNet-50; the paper network without
#      anti-aliasing and CRF, with the CRF only, with anti-aliasing only, with both), bf16,
#      channels_last, batch 32, 512 px, with ratios and peak memory (bench/bench_train.py --variants);
#   2. the PAC-CRF's parts alone (guidance branch, kernel G, mean field) and blur-pool, bf16 autocast,
#      batch 32 (bench/bench_layers.py), and torch.profiler's top kernels of the full network's step
#      (bench/bench_train.py --profile);
#   3. `cxrloc train` end to end on a small real folder whose images are repeated as new patients
#      (E2E_COPIES times, default 6: bench/replicate_nih.py): images/s of whole epochs (data loading,
#      validation and checkpoints included) beside the step throughput of the same network and batch;
#   4. the tests marked `cuda`;
#   5. if time is left, the full network with torch.compile (bench/bench_train.py --compile).
#
# Usage: bash bench/gpu_check.sh [OUT_DIR]          (logs kept in OUT_DIR, default $OUT or /tmp/gpu_check)
# Data for step 3, first found: $NIH_DIR; .nih_pack/ in the repository (make it with
# `python bench/pack_nih.py ../shared/data/nih .nih_pack`, about 30 MiB, and carry it); ../shared/data/nih;
# else generated NIH-format images (cxrloc.data.synthetic), said so in the output.
# Environment: PYTHON (default python3), E2E_SET (extra --set options of step 3, e.g. "arch=resnet18"),
# E2E_COPIES (default 6; 1 uses the folder as it is).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export REPO=$PWD
START=$SECONDS
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() { echo; echo "== $* ($((SECONDS - START)) s)"; }

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

step "1/5 training throughput, five networks (bf16, channels_last, batch 32, 512 px)"
timeout 170 $PY bench/bench_train.py --device cuda --amp bf16 --batch 32 --size 512 --warmup 3 --steps 5 \
    --rounds 3 --variants 2>&1 | tee "$OUT_DIR/bench_train_variants.txt"

step "2/5 the CRF's parts and blur-pool alone; the full network's top kernels"
timeout 45 $PY bench/bench_layers.py --device cuda --amp bf16 --batch 32 --rounds 5 2>&1 | tee "$OUT_DIR/bench_layers.txt"
timeout 45 $PY bench/bench_train.py --device cuda --amp bf16 --batch 32 --size 512 --warmup 2 --steps 3 \
    --profile 3 >"$OUT_DIR/profile.txt" 2>&1
grep -A 32 "^torch.profiler" "$OUT_DIR/profile.txt" | cut -c 1-160

step "3/5 cxrloc train end to end (paper preset, init=scratch, 512 px)"
if [ -n "${NIH_DIR:-}" ]; then DATA=$NIH_DIR
elif [ -d .nih_pack ]; then DATA=.nih_pack
elif [ -d ../shared/data/nih ]; then DATA=../shared/data/nih
else
    DATA=$WORK/synthetic
    echo "no NIH folder found: generated NIH-format images (400, 512 px) stand in for the real ones"
    $PY -c "from cxrloc.data.synthetic import generate_synthetic_nih as g; \
g('$DATA', n_patients=100, images_per_patient=4, size=512, box_fraction=0.5, progress=False)"
fi
COPIES=${E2E_COPIES:-6}
if [ "$COPIES" -gt 1 ] && [ -f "$DATA/Data_Entry_2017.csv" ]; then
    # a few hundred images make sub-second epochs, where per-epoch work weighs far more than on real
    # data: repeat each real image as new patients (bench/replicate_nih.py)
    $PY bench/replicate_nih.py "$DATA" "$WORK/nih_x$COPIES" --copies "$COPIES" || exit 1
    DATA=$WORK/nih_x$COPIES
fi
echo "data: $DATA"
$PY -m cxrloc prepare "$DATA" --out "$WORK/prep" --size 512 --workers 8 2>&1 | tail -2
E2E=(--fold 0 --preset paper --quiet --set init=scratch --set device=cuda)
for kv in ${E2E_SET:-}; do E2E+=(--set "$kv"); done
run_train() {  # $1 = epochs; prints the wall seconds of the whole command
    local t0
    t0=$(date +%s.%N)
    rm -rf "$WORK/run$1"
    $PY -m cxrloc train "$WORK/prep" --out "$WORK/run$1" "${E2E[@]}" --set epochs="$1" \
        >"$OUT_DIR/train_e$1.txt" 2>&1 || { echo "cxrloc train failed, see $OUT_DIR/train_e$1.txt" >&2; tail -5 "$OUT_DIR/train_e$1.txt" >&2; }
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", b - a }'
}
export E2E_SET="${E2E_SET:-}"
TA=$(run_train 2)
TB=$(run_train 6)
$PY - "$WORK/run6/fold_0" "$TA" "$TB" <<'EOF' 2>&1 | tee "$OUT_DIR/train_e2e.txt"
import csv, json, os, subprocess, sys
from pathlib import Path
from cxrloc.config import load_config
from cxrloc.data.dataset import AnnotatedBatchSampler, LocalizationDataset, repeat_factors
from cxrloc.data.prepared import Prepared
fold, ta, tb = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
cfg = load_config(fold / "config.json")
run = json.loads((fold / "run.json").read_text())
ds = LocalizationDataset(Prepared.open(run["prepared_dir"]), run["train_ids"], cfg, augment=False)
sampler = AnnotatedBatchSampler(ds.is_annotated(), cfg.batch_size, annotated_per_batch=cfg.annotated_per_batch,
                                seed=cfg.seed, max_batches=cfg.max_steps_per_epoch,
                                repeat_factors=repeat_factors(ds.boxes, cfg.repeat_threshold))
per_epoch = len(sampler) * cfg.batch_size
rows = list(csv.DictReader((fold / "metrics.csv").open()))
print(f"{len(run['train_ids'])} training images, {len(run['val_ids'])} validation; {per_epoch} items per epoch "
      f"(batch {cfg.batch_size}, workers {cfg.workers}, {cfg.arch}, crf={cfg.crf}, antialias={cfg.antialias})")
print("epoch seconds (training + validation, from metrics.csv):", [r["time_s"] for r in rows])
# whole commands of 2 and 6 epochs: the difference is 4 epochs with everything included (loading,
# validation, checkpoint writes), start-up and the first epochs' warm-up cancelled out
e2e = 4 * per_epoch / max(tb - ta, 1e-9)
print(f"end to end: 4 epochs in {tb - ta:.1f} s -> {e2e:.1f} images/s")
late = [float(r["time_s"]) for r in rows[2:]]
if late:
    print(f"epochs 3-6 from metrics.csv (training + validation): {per_epoch * len(late) / sum(late):.1f} images/s")
extra = [a for kv in os.environ.get("E2E_SET", "").split() for a in ("--set", kv)]
out = subprocess.run([sys.executable, os.path.join(os.environ["REPO"], "bench", "bench_train.py"), "--device", "cuda", "--amp", "bf16", "--size",
                      str(cfg.image_size), "--batch", str(cfg.batch_size), "--warmup", "3", "--steps", "5",
                      "--rounds", "2", *extra], capture_output=True, text=True)
step = [line for line in out.stdout.splitlines() if line.startswith("cxrloc ")]
if not step:
    print(out.stdout[-2000:], out.stderr[-2000:])
    sys.exit(1)
ips = float(step[0].rsplit(":", 1)[1].split()[0])
print(step[0])
print(f"end-to-end / step throughput: {e2e / ips:.2f} (aim >= 0.8)")
EOF

step "4/5 tests marked cuda"
# only the files that hold such tests: collecting the others would import packages (pydicom) the
# GPU image may lack
mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" tests/test_*.py)
timeout 150 $PY -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}" 2>&1 | tee "$OUT_DIR/pytest_cuda.txt" | tail -15

LEFT=$((290 - (SECONDS - START)))
if [ "$LEFT" -gt 60 ]; then
    step "5/5 torch.compile of the full network (compile=true), ${LEFT} s left"
    timeout "$LEFT" $PY bench/bench_train.py --device cuda --amp bf16 --batch 32 --size 512 --warmup 3 --steps 5 \
        --rounds 3 --compile 2>&1 | tee "$OUT_DIR/bench_train_compile.txt"
else
    step "5/5 torch.compile skipped: under a minute left of the 5"
fi
rm -rf "$WORK"
step "done; logs in $OUT_DIR"
