"""Collect `cxrloc evaluate` outputs of several runs into the tables and plot of docs/results.md.

Usage:
    python experiments/compile_results.py RUNS_DIR --out docs/results_nih.md --plot docs/img/acc_vs_t.png \
        --method "full=full" --method "li2018=li2018" ...

Each ``NAME=RUN`` names a run folder under RUNS_DIR whose ``eval/results.json`` exists. The prior is
taken from the first method's evaluation (the prior depends on the folds only, not on the model).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cxrloc.classes import BOXED_CLASSES

SHORT = {"Atelectasis": "Atel", "Cardiomegaly": "Card", "Effusion": "Effu", "Infiltration": "Infi",
         "Mass": "Mass", "Nodule": "Nodu", "Pneumonia": "Pnia", "Pneumothorax": "Pnth"}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _per_fold(result: dict, key: str, metric: str) -> dict[int, list[float]]:
    return {int(f["fold"]): f[key][metric] for f in result["per_fold"]}


def paired_differences(results: dict[str, dict], ts: list[float], ref_label: str) -> list[str]:
    """Method ``ref_label`` minus each other method (and the prior), fold by fold, in mean IoU/IoR accuracy.

    Folds share their test images, so the per-fold difference removes the fold-to-fold spread that
    the ± std of the main tables carries; "ahead" counts the folds where ``ref_label`` is higher.
    """
    ref = results[ref_label]
    others = [(label, r) for label, r in results.items() if label != ref_label]
    lines: list[str] = []
    for metric in ("iou", "ior"):
        title = f"{ref_label} minus each method, fold by fold ({metric.upper()} accuracy, mean of 8 classes)"
        lines.append(f"### {title}\n")
        lines.append("| against | T | mean difference | std over folds | folds ahead |")
        lines.append("|---|---|---|---|---|")
        mine = _per_fold(ref, "model_boxed_mean", metric)
        against = [(label, _per_fold(r, "model_boxed_mean", metric)) for label, r in others]
        against.append(("prior", _per_fold(ref, "prior_boxed_mean", metric)))
        if "prior_t_boxed_mean" in ref["per_fold"][0]:
            against.append(("prior per-T", _per_fold(ref, "prior_t_boxed_mean", metric)))
        for j, t in enumerate(ts):
            for label, theirs in against:
                folds = sorted(set(mine) & set(theirs))
                diffs = [mine[f][j] - theirs[f][j] for f in folds]
                if not diffs:
                    continue
                mean = statistics.mean(diffs)
                std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                ahead = sum(d > 0 for d in diffs)
                lines.append(f"| {label} | {t:g} | {mean:+.3f} | {std:.3f} | {ahead} of {len(diffs)} |")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--method", action="append", required=True, help="LABEL=RUN_FOLDER_NAME")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--compare", action="append", help="LABEL to compare fold by fold (default: the first)")
    args = ap.parse_args()

    results = {}
    for item in args.method:
        label, run = item.split("=", 1)
        path = args.runs / run / "eval" / "results.json"
        results[label] = json.loads(path.read_text())
    first = next(iter(results.values()))
    ts = first["ts"]
    lines: list[str] = []
    for metric in ("iou", "ior"):
        lines.append(f"### {metric.upper()} accuracy (mean over folds {first['folds']})\n")
        lines.append("| method | T | " + " | ".join(SHORT[c] for c in BOXED_CLASSES) + " | mean ± std |")
        lines.append("|---|---|" + "---|" * (len(BOXED_CLASSES) + 1))
        for j, t in enumerate(ts):
            rows = [(label, r["summary"]["model"][metric]) for label, r in results.items()]
            rows.append(("prior", first["summary"]["prior"][metric]))
            if "prior_t" in first["summary"]:
                rows.append(("prior per-T", first["summary"]["prior_t"][metric]))
            for label, s in rows:
                cells = [_fmt(s["per_class_mean"][c][j]) for c in BOXED_CLASSES]
                std = s["boxed_mean_std"][j]
                mean = _fmt(s["boxed_mean"][j]) + ("" if std is None else f" ± {std:.3f}")
                lines.append(f"| {label} | {t:g} | " + " | ".join(cells) + f" | {mean} |")
        lines.append("")
    for ref_label in args.compare or [next(iter(results))]:
        if ref_label not in results:
            raise SystemExit(f"--compare {ref_label!r} is not one of the --method labels: {', '.join(results)}")
        lines += paired_differences(results, ts, ref_label)
    lines.append("### AUROC of the image score 1ᵀz (mean over folds, 14 classes)\n")
    lines.append("| method | " + " | ".join(results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for c in first["summary"]["auroc"]["mean"]:
        lines.append(f"| {c} | " + " | ".join(_fmt(r["summary"]["auroc"]["mean"][c]) for r in results.values()) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"Tables written to {args.out}")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, metric in zip(axes, ("iou", "ior"), strict=True):
            for label, r in results.items():
                ax.plot(ts, r["summary"]["model"][metric]["boxed_mean"], marker="o", label=label)
            ax.plot(ts, first["summary"]["prior"][metric]["boxed_mean"], "k--", marker="s", label="prior")
            if "prior_t" in first["summary"]:
                ax.plot(ts, first["summary"]["prior_t"][metric]["boxed_mean"], "k:", marker="^", label="prior per-T")
            ax.set_xlabel("T")
            ax.set_title(f"{metric.upper()} accuracy, mean of 8 boxed classes")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy")
        axes[0].legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"Plot written to {args.plot}")


if __name__ == "__main__":
    main()
