"""Score runs on their VALIDATION images (carved out of each fold's training patients): single
models, seed ensembles (mean of z), test-time augmentation, beside both priors fitted on the
fold's training boxes. Used to choose the recipe without reading test folds (docs/results.md).

Usage:
    python experiments/val_scores.py runs/s/base_s0 [runs/s/base_s1 ...] [--ensemble] [--tta N]

Without --ensemble every run is scored alone; with it the runs' z are averaged (they must share
validation images: train them with the same --set val_seed). z is cached in RUN/fold_K/val_z.npz.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cxrloc.checkpoint import load_model
from cxrloc.classes import BOXED_CLASSES
from cxrloc.data.prepared import Prepared
from cxrloc.evaluation.evaluate import per_t_prior_accuracy
from cxrloc.evaluation.metrics import localization_table, mean_localization_accuracy
from cxrloc.evaluation.prior import boxes_by_class, fit_prior
from cxrloc.inference.batch import predict_prepared

TS = (0.1, 0.3, 0.5)
BOXED = list(range(len(BOXED_CLASSES)))


def fold_z(fold_dir: Path, ids: list[str], prepared: Prepared, tta: int, which: str) -> np.ndarray:
    cache = fold_dir / f"val_z_{which}_tta{tta}.npz"
    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        if list(data["ids"]) == ids:
            return data["z"]
    model, _, cfg = load_model(fold_dir, device="cpu", which=which)
    z = predict_prepared(model, prepared, ids, image_size=cfg.image_size, progress=False, tta=tta)
    np.savez(cache, z=z, ids=np.array(ids))
    return z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--ensemble", action="store_true")
    ap.add_argument("--tta", type=int, default=1)
    ap.add_argument("--which", default="best")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    folds = [int(f) for f in args.folds.split(",")]
    groups = [args.runs] if args.ensemble else [[r] for r in args.runs]
    report = {}
    for group in groups:
        label = "+".join(r.name for r in group) + (f" tta{args.tta}" if args.tta > 1 else "")
        per_fold = {"model": [], "prior": [], "prior_t": []}
        for f in folds:
            dirs = [r / f"fold_{f}" for r in group]
            runs = [json.loads((d / "run.json").read_text()) for d in dirs]
            val = [str(i) for i in runs[0]["val_ids"]]
            if any([str(i) for i in r["val_ids"]] != val for r in runs):
                raise SystemExit(f"{label}: fold {f} members have different validation images")
            prepared = Prepared.open(runs[0]["prepared_dir"])
            ids = [i for i in val if prepared.boxes(i)]
            z = np.mean([fold_z(d, ids, prepared, args.tta, args.which) for d in dirs], axis=0)
            boxes = [prepared.boxes(i) for i in ids]
            table = localization_table(z, boxes, TS)
            train_boxes = boxes_by_class(prepared.boxes(str(i)) for i in runs[0]["train_ids"])
            prior = localization_table(fit_prior(train_boxes, z.shape[-1]).predict(len(ids)), boxes, TS)
            prior_t = per_t_prior_accuracy(train_boxes, z.shape[-1], boxes, TS)
            count = table["count"]  # the same boxes for the model and both priors
            for key, t in (("model", table), ("prior", prior), ("prior_t", {**prior_t, "count": count})):
                per_fold[key].append(mean_localization_accuracy(t, "iou", BOXED))
            per_fold.setdefault("per_class", []).append(table["accuracy"]["iou"][BOXED].tolist())
            per_fold.setdefault("prior_t_per_class", []).append(prior_t["accuracy"]["iou"][BOXED].tolist())
        means = {k: np.mean(v, axis=0) for k, v in per_fold.items() if not k.endswith("per_class")}
        best_prior = np.maximum(means["prior"], means["prior_t"])
        pc = np.nanmean(np.array(per_fold["per_class"], dtype=float), axis=0)
        print(
            f"{label:40s} val IoU acc @0.1/0.3/0.5: {' / '.join(f'{v:.3f}' for v in means['model'])}"
            f"  (mean {means['model'].mean():.3f}; vs stronger prior "
            f"{' / '.join(f'{v:+.3f}' for v in means['model'] - best_prior)})"
        )
        ppc = np.nanmean(np.array(per_fold["prior_t_per_class"], dtype=float), axis=0)
        for j, t in enumerate(TS):
            cells = zip(BOXED_CLASSES, pc[:, j], ppc[:, j], strict=True)
            text = " ".join(f"{c[:4]} {v:.2f}/{w:.2f}" for c, v, w in cells)
            print(f"    per class @{t:g} (model/per-T prior): {text}")
        report[label] = {k: v.tolist() for k, v in means.items()}
    if len(groups) > 0:
        print(f"{'prior (one q)':40s} {' / '.join(f'{v:.3f}' for v in means['prior'])}")
        print(f"{'prior per-T':40s} {' / '.join(f'{v:.3f}' for v in means['prior_t'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
