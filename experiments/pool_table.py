"""Issue 19, part 1: the 0 / 50 / 100 % pool table from the runs of experiments/pool_table.sh.

Every finished (run, fold) piece is calibrated on its validation images (`cxrloc calibrate`, the
default count-matched operating point) and evaluated once on its TEST fold (`cxrloc evaluate RUN
--fold N --metric both --geometry both`; both skipped when already written), then:

- per method and pool fraction: mean AUROC of the 8 boxed classes, IoU and IoR accuracy (mean of the
  8 boxed classes) at T = 0.1 / 0.3 / 0.5, exact geometry (and the grid geometry in a second table);
  a fold's value is the mean over the seeds finished for it, the table the mean over folds;
- both priors (fitted on each fold's training boxes; the same for every fraction) and the stronger one;
- paired fold-by-fold differences (100 % - 0 %, 50 % - 0 %, method - li2018) over the folds and seeds
  that both sides have finished.

Every piece's values are also written to a small JSON record (``--record``, default
``docs/results_pool_pieces.json``, committed): the runs folder is large and does not outlive a
session's machine, the record does. Pieces in the record that are not in the runs folder are added
to the tables (a piece in both is taken from the runs folder), so a later session that reruns only
the missing pieces still gets the whole table.

Usage:
    python experiments/pool_table.py runs/pool [--out docs/results_pool_table.md] [--no-evaluate]
                                               [--record docs/results_pool_pieces.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from seed_table import fmt_ms  # experiments/ is on sys.path when this script runs

from cxrloc.classes import BOXED_CLASSES

RUN_RE = re.compile(r"^(?:(m|li)_u(\d+)|(cand))_s(\d+)$")  # cand_s*: experiments/recipe_candidate.sh (100 %)
TS = (0.1, 0.3, 0.5)
LABEL = {"m": "method", "li": "li2018", "cand": "candidate (BCE init + image_bce)"}


def finished(out: Path, name: str, fold: int, stage: str) -> Path | None:
    """The stage folder to evaluate when the piece is finished: ``RUN/unary`` for the unary table (a
    finished ``--stage all`` piece includes its unary stage), ``RUN/joint`` for the recipe table; li2018
    has only its unary stage, which is its whole protocol."""
    pieces = out / "pieces"
    done_all = (pieces / f"{name}_all_fold{fold}").is_file()
    if stage == "unary" or name.startswith("li_"):
        ok = done_all or (pieces / f"{name}_unary_fold{fold}").is_file()
        return (out / name / "unary").resolve() if ok else None
    return (out / name / "joint").resolve() if done_all else None


def evaluated(out: Path, name: str, fold: int, stage_name: str, evaluate: bool) -> dict | None:
    stage = finished(out, name, fold, stage_name)
    if stage is None:
        return None
    res = stage / f"eval_fold{fold}" / "results.json"
    if not res.is_file() and evaluate:
        if not (stage / f"fold_{fold}" / "calibration.json").is_file():  # the default operating point
            cmd = ["cxrloc", "calibrate", str(stage), "--fold", str(fold)]
            print("+", " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        cmd = ["cxrloc", "evaluate", str(stage), "--fold", str(fold), "--metric", "both", "--geometry", "both"]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if not res.is_file():
        return None
    return json.loads(res.read_text())


def fold_values(result: dict) -> dict[str, list[float] | float]:
    (f,) = result["per_fold"]
    ts = [round(t, 3) for t in result["ts"]]
    idx = [ts.index(t) for t in TS]
    auroc = [f["auroc"][c] for c in BOXED_CLASSES if f["auroc"].get(c) is not None]
    out: dict[str, list[float] | float] = {"auroc": statistics.mean(auroc)}
    for m in ("iou", "ior"):
        out[m] = [f["model_boxed_mean"][m][i] for i in idx]
        out[f"grid_{m}"] = [f["grid"]["model_boxed_mean"][m][i] for i in idx]
        for p in ("prior", "prior_t"):
            out[f"{p}_{m}"] = [f[f"{p}_boxed_mean"][m][i] for i in idx]
            out[f"grid_{p}_{m}"] = [f["grid"][f"{p}_boxed_mean"][m][i] for i in idx]
        out[f"mass_nodule_{m}"] = [f["model"][m][c][idx[0]] for c in ("Mass", "Nodule")]
        out[f"prior_mass_nodule_{m}"] = [max(f["prior"][m][c][idx[0]], f["prior_t"][m][c][idx[0]])
                                         for c in ("Mass", "Nodule")]
    out["present_per_image"] = f["classification"]["present_per_image"]
    out["labels_per_image"] = f["classification"]["labels_per_image"]
    return out


def collect(out: Path, stage: str, evaluate: bool, candidate: bool = False
            ) -> dict[tuple[str, int], dict[int, dict[int, dict]]]:
    """``{(method, percent): {fold: {seed: values}}}`` of every finished piece of ``stage``; the part-3
    candidate (``cand_s*``, full recipe only) only with ``candidate`` (its test folds are read after the
    rule of experiments/candidate_decision.py has been applied on validation images)."""
    cells: dict[tuple[str, int], dict[int, dict[int, dict]]] = {}
    for run in sorted(p for p in out.iterdir() if p.is_dir() and RUN_RE.match(p.name)):
        method, pct, cand, seed = RUN_RE.match(run.name).groups()
        if cand:
            if not candidate or stage != "all":
                continue
            method, pct = "cand", "100"
        for fold in range(5):
            result = evaluated(out, run.name, fold, stage, evaluate)
            if result is not None:
                cells.setdefault((method, int(pct)), {}).setdefault(fold, {})[int(seed)] = fold_values(result)
    return cells


def read_record(record: Path) -> list[dict]:
    """The rows written by an earlier run of this script (:func:`write_record`); none without the file."""
    return json.loads(record.read_text())["pieces"] if record.is_file() else []


def merge_record(cells: dict, rows: list[dict], stage: str, candidate: bool) -> int:
    """Add the recorded pieces of ``stage`` that ``cells`` lacks (the candidate's only with ``candidate``);
    returns how many were added."""
    added = 0
    for row in rows:
        if row["stage"] != stage or (row["method"] == "cand" and not candidate):
            continue
        by_seed = cells.setdefault((row["method"], row["pct"]), {}).setdefault(row["fold"], {})
        if row["seed"] not in by_seed:
            by_seed[row["seed"]] = row["values"]
            added += 1
    return added


def write_record(record: Path, all_cells: dict[str, dict]) -> None:
    """Every piece's values, one row per (stage, method, pool, fold, seed); written atomically."""
    rows = [{"stage": stage, "method": m, "pct": pct, "fold": fold, "seed": seed, "values": vals}
            for stage, cells in all_cells.items()
            for (m, pct), folds in sorted(cells.items())
            for fold, seeds in sorted(folds.items())
            for seed, vals in sorted(seeds.items())]
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"written_by": "experiments/pool_table.py", "pieces": rows}, indent=1) + "\n")
    tmp.replace(record)


def seed_mean(by_seed: dict[int, dict], key: str) -> list[float]:
    vals = [v[key] for v in by_seed.values()]
    if isinstance(vals[0], list):
        return [statistics.mean(v[j] for v in vals) for j in range(len(vals[0]))]
    return [statistics.mean(vals)]


def ms(values: list[float]) -> str:
    """Mean ± sample std as seed_table.py writes it, ``n/a`` for no value."""
    return fmt_ms(values) if values else "n/a"


def main_table(cells: dict, geometry: str) -> list[str]:
    g = "" if geometry == "exact" else "grid_"
    head = ("| method | pool | folds × runs | AUROC (8 boxed) | " + " | ".join(f"IoU T={t:g}" for t in TS)
            + " | " + " | ".join(f"IoR T={t:g}" for t in TS) + " |")
    lines = [head, "|---|---|---|---|" + "---|" * 6]
    priors: dict[int, dict] = {}
    for (method, pct), folds in sorted(cells.items()):
        fs = sorted(folds)
        n = sum(len(folds[f]) for f in fs)
        row = [LABEL[method], f"{pct} %", f"{len(fs)} × {n}",
               ms([seed_mean(folds[f], "auroc")[0] for f in fs])]
        for m in ("iou", "ior"):
            row += [ms([seed_mean(folds[f], g + m)[j] for f in fs]) for j in range(3)]
        lines.append("| " + " | ".join(row) + " |")
        for f in fs:
            priors.setdefault(f, next(iter(folds[f].values())))
    fs = sorted(priors)
    for label, key in (("prior (one q)", "prior"), ("prior per-T", "prior_t"), ("stronger prior", None)):
        row = [label, "-", f"{len(fs)} folds", "-"]
        for m in ("iou", "ior"):
            for j in range(3):
                if key is None:
                    vals = [max(priors[f][f"{g}prior_{m}"][j], priors[f][f"{g}prior_t_{m}"][j]) for f in fs]
                else:
                    vals = [priors[f][f"{g}{key}_{m}"][j] for f in fs]
                row.append(ms(vals))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def paired(cells: dict, a: tuple[str, int], b: tuple[str, int]) -> str | None:
    """``a - b`` over the (fold, seed) pieces both have: AUROC, IoU at the three T."""
    if a not in cells or b not in cells:
        return None
    pairs = [(cells[a][f][s], cells[b][f][s]) for f in cells[a] if f in cells[b]
             for s in cells[a][f] if s in cells[b][f]]
    if not pairs:
        return None
    cols = []
    for key, j in (("auroc", None), ("iou", 0), ("iou", 1), ("iou", 2), ("ior", 0), ("ior", 1), ("ior", 2)):
        d = [(x[key] if j is None else x[key][j]) - (y[key] if j is None else y[key][j]) for x, y in pairs]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        cols.append(f"{statistics.mean(d):+.3f} ± {sd:.3f} ({sum(v > 0 for v in d)}/{len(d)})")
    return (f"| {LABEL[a[0]]} {a[1]} % − {LABEL[b[0]]} {b[1]} % | {len(pairs)} | " + " | ".join(cols) + " |")


def report(cells: dict) -> str:
    lines = ["Test folds (each read once), 704 boxed NIH images in 5 patient-grouped folds, 128 px, `cpu` "
             "preset. Mean over folds ± sample std over folds; a fold's value is the mean over its finished "
             "seeds. IoU/IoR: accuracy at T, mean of the 8 boxed classes.\n",
             "#### Exact geometry (cxrloc's default)\n", *main_table(cells, "exact"), "",
             "#### Grid geometry (boxes rasterised as in the public Li et al. code; compare published tables "
             "with this one)\n", *main_table(cells, "grid"), "",
             "#### Paired differences, piece by piece (same fold and seed; mean ± std, pieces ahead / pieces)\n",
             "| difference | pieces | AUROC | IoU T=0.1 | IoU T=0.3 | IoU T=0.5 | IoR T=0.1 | IoR T=0.3 | IoR T=0.5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in ("m", "li"):
        for pct in (100, 50):
            row = paired(cells, (method, pct), (method, 0))
            if row:
                lines.append(row)
    for pct in (0, 50, 100):
        row = paired(cells, ("m", pct), ("li", pct))
        if row:
            lines.append(row)
    for b in (("m", 0), ("m", 100)):
        row = paired(cells, ("cand", 100), b)
        if row:
            lines.append(row)
    lines += ["", "#### Mass and Nodule at T = 0.1 (IoU), against the stronger prior; calls per image\n",
              "| method | pool | Mass | Nodule | prior Mass | prior Nodule | present / image | labels / image |",
              "|---|---|---|---|---|---|---|---|"]
    for (method, pct), folds in sorted(cells.items()):
        fs = sorted(folds)
        mn = [seed_mean(folds[f], "mass_nodule_iou") for f in fs]
        pr = [seed_mean(folds[f], "prior_mass_nodule_iou") for f in fs]
        pp = [seed_mean(folds[f], "present_per_image")[0] for f in fs]
        lp = [seed_mean(folds[f], "labels_per_image")[0] for f in fs]
        lines.append(f"| {LABEL[method]} | {pct} % | {ms([v[0] for v in mn])} | {ms([v[1] for v in mn])} | "
                     f"{ms([v[0] for v in pr])} | {ms([v[1] for v in pr])} | {ms(pp)} | {ms(lp)} |")
    return "\n".join(lines) + "\n"


def check_folds(out: Path) -> None:
    """The three prepared folders must hold the same folds (test images and boxed training images)."""
    splits = {p.name: json.loads((p / "splits.json").read_text()) for p in sorted(out.glob("u*"))
              if (p / "splits.json").is_file()}
    ref = next(iter(splits.values()))
    for name, sp in splits.items():
        for a, b in zip(ref["folds"], sp["folds"], strict=True):
            if a["test"] != b["test"] or a["train_annotated"] != b["train_annotated"]:
                raise SystemExit(f"{name}: fold {a['fold']} differs from the other prepared folders")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-evaluate", action="store_true", help="only read results.json already written")
    ap.add_argument("--with-candidate", action="store_true",
                    help="add the part-3 candidate (cand_s*) to the full-recipe table: reads its test folds")
    ap.add_argument("--record", type=Path, default=Path("docs/results_pool_pieces.json"),
                    help="per-piece values: read (pieces the runs folder lacks) and rewritten")
    args = ap.parse_args()
    check_folds(args.runs)
    rows = read_record(args.record)
    text = ""
    all_cells: dict[str, dict] = {}
    for stage, title in (("unary", "Unary stage (16 epochs) for both methods"),
                         ("all", "The full recipe (`--stage all`: unary, CRF, joint); li2018 as trained (unary)")):
        cells = collect(args.runs, stage, not args.no_evaluate, args.with_candidate)
        added = merge_record(cells, rows, stage, args.with_candidate)
        if added:
            print(f"{stage}: {added} pieces from {args.record}", file=sys.stderr)
        if any(m == "m" for m, _ in cells):
            text += f"### {title}\n\n" + report(cells) + "\n"
        merge_record(cells, rows, stage, candidate=True)  # the record keeps the candidate's rows either way
        all_cells[stage] = cells
    print(text)
    write_record(args.record, all_cells)
    if args.out:
        args.out.write_text("# The unboxed pool on real data: tables (issue 19, part 1)\n\nWritten by `python "
                            f"experiments/pool_table.py {args.runs}` from the pieces finished so far (see "
                            "docs/results.md, \"The paper's premise on real data\").\n\n" + text)


if __name__ == "__main__":
    main()
