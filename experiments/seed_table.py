"""Tables over training seeds: each method's runs (one per seed) averaged fold by fold, beside both
priors and the stronger of the two at each T, with paired fold-by-fold differences.

Usage:
    python experiments/seed_table.py RUNS_DIR --group "full=joint_s0,joint_s1" --group "li2018=li_s0,li_s1" \
        --ref full --out docs/results_seeds.md [--split val]

Each run folder must hold ``eval/results.json`` (``eval_val/`` with ``--split val``) written by
``cxrloc evaluate``. For every fold, a method's value is the mean over its runs (seeds); the table
gives the mean over folds and its sample standard deviation. The priors come from the first run
(they depend on the folds only). "stronger prior" is, at each T and fold, the larger of the two
priors' mean accuracies (a floor that knows the test folds' better prior: conservative for claims).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cxrloc.classes import BOXED_CLASSES
from cxrloc.evaluation.report import SHORT


def load(runs_dir: Path, run: str, split: str) -> dict:
    sub = "eval" if split == "test" else "eval_val"
    return json.loads((runs_dir / run / sub / "results.json").read_text())


def per_fold(result: dict, key: str, metric: str) -> dict[int, list[float]]:
    """``{fold: [value at each T]}`` of a per-fold entry (e.g. ``model_boxed_mean``)."""
    return {int(f["fold"]): f[key][metric] for f in result["per_fold"]}


def per_fold_class(result: dict, key: str, metric: str) -> dict[int, dict[str, list[float | None]]]:
    return {int(f["fold"]): f[key][metric] for f in result["per_fold"]}


def mean_runs(values: list[dict[int, list[float]]]) -> dict[int, list[float]]:
    folds = sorted(set.intersection(*(set(v) for v in values)))
    return {f: [statistics.mean(v[f][j] for v in values) for j in range(len(values[0][f]))] for f in folds}


def fmt_ms(values: list[float]) -> str:
    m = statistics.mean(values)
    return f"{m:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{m:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--group", action="append", required=True, help="LABEL=RUN[,RUN...] (one run per seed)")
    ap.add_argument("--ref", help="LABEL compared fold by fold with every other row (default: the first)")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    groups: dict[str, list[dict]] = {}
    for item in args.group:
        label, runs = item.split("=", 1)
        groups[label] = [load(args.runs, r.strip(), args.split) for r in runs.split(",")]
    first = next(iter(groups.values()))[0]
    ts = first["ts"]
    ref = args.ref or next(iter(groups))
    lines = [f"Split: {args.split} images; folds {first['folds']}; mean over folds ± sample std over folds; "
             "a method's per-fold value is the mean over its seeds.\n"]
    for metric in ("iou", "ior"):
        rows: dict[str, dict[int, list[float]]] = {
            label: mean_runs([per_fold(r, "model_boxed_mean", metric) for r in results])
            for label, results in groups.items()
        }
        prior = per_fold(first, "prior_boxed_mean", metric)
        prior_t = per_fold(first, "prior_t_boxed_mean", metric)
        rows["prior (one q)"] = prior
        rows["prior per-T"] = prior_t
        rows["stronger prior"] = {f: [max(a, b) for a, b in zip(prior[f], prior_t[f], strict=True)] for f in prior}
        lines.append(f"#### {metric.upper()} accuracy, mean of the 8 boxed classes\n")
        lines.append("| method | seeds | " + " | ".join(f"T = {t:g}" for t in ts) + " |")
        lines.append("|---|---|" + "---|" * len(ts))
        for label, vals in rows.items():
            seeds = str(len(groups[label])) if label in groups else "-"
            cells = [fmt_ms([vals[f][j] for f in sorted(vals)]) for j in range(len(ts))]
            lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
        # Per class, at each T (mean over seeds and folds).
        lines.append(f"Per class ({metric.upper()}, mean over seeds and folds):\n")
        lines.append("| method | T | " + " | ".join(SHORT[c] for c in BOXED_CLASSES) + " |")
        lines.append("|---|---|" + "---|" * len(BOXED_CLASSES))
        for j, t in enumerate(ts):
            sources = [
                (label, [per_fold_class(r, "model", metric) for r in results]) for label, results in groups.items()
            ]
            sources.append(("prior per-T", [per_fold_class(first, "prior_t", metric)]))
            sources.append(("prior (one q)", [per_fold_class(first, "prior", metric)]))
            for label, runs in sources:
                cells = []
                for c in BOXED_CLASSES:
                    vals = [run[f][c][j] for run in runs for f in run if run[f][c][j] is not None]
                    cells.append(f"{statistics.mean(vals):.3f}" if vals else "n/a")
                lines.append(f"| {label} | {t:g} | " + " | ".join(cells) + " |")
        lines.append("")
        # Paired differences of the reference against every other row.
        lines.append(f"{ref} minus each row, fold by fold ({metric.upper()}; mean ± std over folds, folds ahead):\n")
        lines.append("| against | " + " | ".join(f"T = {t:g}" for t in ts) + " |")
        lines.append("|---|" + "---|" * len(ts))
        mine = rows[ref]
        for label, theirs in rows.items():
            if label == ref:
                continue
            folds = sorted(set(mine) & set(theirs))
            cells = []
            for j in range(len(ts)):
                d = [mine[f][j] - theirs[f][j] for f in folds]
                sd = statistics.stdev(d) if len(d) > 1 else 0.0
                cells.append(f"{statistics.mean(d):+.3f} ± {sd:.3f} ({sum(x > 0 for x in d)}/{len(d)})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"Tables written to {args.out}")


if __name__ == "__main__":
    main()
