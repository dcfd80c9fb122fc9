"""Issue 19, part 3: the rule fixed before the candidate's numbers were seen (docs/results.md, "A recipe
that uses the image-level labels"), applied on VALIDATION images only.

For every fold where both runs have finished, the candidate (``experiments/recipe_candidate.sh``: a BCE
classifier's backbone as init, ``image_bce=1``, 100 % of the pool, ``--stage all``) and the README recipe
of the same seed (``m_u0_s*``: ``--stage all``, no pool) are scored on the fold's validation images:

- AUROC of ``1'z`` (mean of the 8 boxed classes) on all validation images of the ``u100`` folder (boxed
  and unboxed), as ``experiments/bce_reference.py --score-run`` computes it;
- IoU accuracy at T = 0.1 / 0.3 / 0.5 (mean of the 8 boxed classes) on the boxed validation images,
  as ``experiments/val_scores.py`` computes it (the same images for both runs: checked).

The candidate replaces the README recipe if (1) its AUROC is higher by at least 0.02 on average and on at
least 4 of 5 folds, and (2) its IoU accuracy averaged over the three T is no more than 0.01 below the
recipe's on average. No test fold is read.

Usage:
    python experiments/candidate_decision.py runs/pool [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from bce_reference import score_run  # experiments/ is on sys.path when this script runs
from val_scores import TS, fold_z

from cxrloc.classes import BOXED_CLASSES
from cxrloc.data.prepared import Prepared
from cxrloc.evaluation.metrics import localization_table, mean_localization_accuracy

BOXED = list(range(len(BOXED_CLASSES)))
AUROC_GAIN, AUROC_FOLDS, IOU_LOSS = 0.02, 4, 0.01


def val_iou(stage: Path, fold: int) -> tuple[list[float], list[str]]:
    """IoU accuracy at TS (8 boxed classes) of ``stage``'s best checkpoint on its boxed validation images."""
    d = stage / f"fold_{fold}"
    run = json.loads((d / "run.json").read_text())
    prepared = Prepared.open(run["prepared_dir"])
    ids = [str(i) for i in run["val_ids"] if prepared.boxes(str(i))]
    z = fold_z(d, ids, prepared, 1, "best")
    table = localization_table(z, [prepared.boxes(i) for i in ids], TS)
    return [float(v) for v in mean_localization_accuracy(table, "iou", BOXED)], ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    u100 = Prepared.open(args.runs / "u100")
    cand, ref = args.runs / f"cand_s{args.seed}" / "joint", args.runs / f"m_u0_s{args.seed}" / "joint"
    rows = []
    print("| fold | AUROC candidate | AUROC recipe | difference | IoU candidate (0.1/0.3/0.5) | IoU recipe | "
          "mean IoU difference |\n|---|---|---|---|---|---|---|")
    for fold in range(5):
        done = [(args.runs / "pieces" / f"{n}_all_fold{fold}").is_file() for n in (f"cand_s{args.seed}",
                                                                                   f"m_u0_s{args.seed}")]
        if not all(done):
            continue
        a_c = score_run(u100, cand, fold, 0, 0.1)["auroc_boxed"]
        a_r = score_run(u100, ref, fold, 0, 0.1)["auroc_boxed"]
        i_c, ids_c = val_iou(cand, fold)
        i_r, ids_r = val_iou(ref, fold)
        if ids_c != ids_r:
            raise SystemExit(f"fold {fold}: the two runs have different boxed validation images")
        d_iou = float(np.mean(i_c) - np.mean(i_r))
        rows.append({"fold": fold, "auroc": [a_c, a_r], "iou": [i_c, i_r], "d_auroc": a_c - a_r, "d_iou": d_iou})
        print(f"| {fold} | {a_c:.3f} | {a_r:.3f} | {a_c - a_r:+.3f} | {' / '.join(f'{v:.3f}' for v in i_c)} | "
              f"{' / '.join(f'{v:.3f}' for v in i_r)} | {d_iou:+.3f} |", flush=True)
    if not rows:
        raise SystemExit("no fold has both runs finished")
    d_a = [r["d_auroc"] for r in rows]
    d_i = [r["d_iou"] for r in rows]
    ahead = sum(v >= AUROC_GAIN for v in d_a)
    ok_auroc = statistics.mean(d_a) >= AUROC_GAIN and ahead >= min(AUROC_FOLDS, len(rows)) and len(rows) == 5
    ok_iou = statistics.mean(d_i) >= -IOU_LOSS
    print(f"\nfolds: {len(rows)}; AUROC difference {statistics.mean(d_a):+.3f} (>= {AUROC_GAIN} on {ahead} of "
          f"{len(rows)} folds); mean IoU difference {statistics.mean(d_i):+.3f}")
    verdict = "the candidate replaces the README recipe" if ok_auroc and ok_iou else "the README recipe stays"
    if len(rows) < 5:
        verdict = f"undecided: {len(rows)} of 5 folds finished"
    print(f"rule: AUROC {'met' if ok_auroc else 'not met'}, IoU {'met' if ok_iou else 'not met'} -> {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "verdict": verdict}, indent=1))


if __name__ == "__main__":
    main()
