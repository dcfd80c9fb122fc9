"""The paper's evaluation of a trained run, beside the data-free prior and the paper's Table 1.

For each fold: ``z`` of the fold's test images (``run.json`` ``test_ids``), IoU / IoR
accuracy at each T per class (:mod:`cxrloc.evaluation.metrics`), the prior fitted on the same fold's
training boxes (``train_ids`` + ``val_ids``) evaluated the same way, and the per-class
AUROC of ``1'z``. Then mean and standard deviation over folds.

Outputs in ``RUN_DIR/eval/`` (written atomically): ``results.json``, ``results.csv``
(long format), ``results.md`` (Markdown tables) and ``per_image.csv`` (one row per test box).
"""

from __future__ import annotations

import datetime as _dt
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich import box
from rich.table import Table

from cxrloc.classes import BOXED_CLASSES, CLASSES
from cxrloc.evaluation.fit_thresholds import fold_dirs, read_run_json
from cxrloc.evaluation.metrics import METRICS, auroc_per_class, image_scores, is_correct, localization_table
from cxrloc.evaluation.prior import boxes_by_class, fit_prior, fit_prior_per_t
from cxrloc.utils import CxrlocError, console, write_json_atomic, write_text_atomic

DEFAULT_TS: tuple[float, ...] = (0.1, 0.3, 0.5)
METHODS: tuple[str, ...] = ("model", "prior", "prior_t")
"""Rows of every report: the model, the prior (one q for all T) and the per-T prior (q chosen per T)."""
LABELS: dict[str, str] = {"model": "model", "prior": "prior", "prior_t": "prior per-T"}
BOXED: tuple[int, ...] = tuple(range(len(BOXED_CLASSES)))

PAPER_TABLE1: dict[str, dict[str, list[float]]] = {
    # Rozenberg et al. 2019, Table 1, T = 0.1, 0% unannotated; "ref." = Li et al. 2018.
    # Values in BOXED_CLASSES order.
    "iou": {
        "paper ours": [0.818, 1.0, 0.882, 0.927, 0.695, 0.404, 0.918, 0.726],
        "paper Li2018": [0.488, 0.989, 0.693, 0.842, 0.342, 0.081, 0.715, 0.437],
    },
    "ior": {
        "paper ours": [0.889, 1.0, 0.92, 0.95, 0.773, 0.58, 0.933, 0.767],
        "paper Li2018": [0.528, 1.0, 0.753, 0.875, 0.452, 0.111, 0.786, 0.473],
    },
}
PAPER_T: float = 0.1

SHORT: dict[str, str] = {
    **{c: c[:4] for c in CLASSES},
    # The paper's abbreviations; "Pneu" alone would not tell Pneumonia from Pneumothorax.
    "Pneumonia": "Pnia",
    "Pneumothorax": "Pnth",
    "Pleural_Thickening": "PlTh",
    "Consolidation": "Cons",
}


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (ddof=1) over axis 0, ignoring NaN (NaN std for one value)."""
    values = np.asarray(values, dtype=np.float64)
    n = np.sum(~np.isnan(values), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(values, axis=0) / np.maximum(n, 1), np.nan)
        sq = np.nansum((values - mean) ** 2, axis=0)
        std = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)), np.nan)
    return mean, std


def _boxed_mean(acc: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Mean over the boxed classes that have at least one test box: ``(K, T) -> (T,)``."""
    idx = [k for k in BOXED if count[k] > 0]
    return acc[idx].mean(axis=0) if idx else np.full(acc.shape[1], np.nan)


def evaluate_fold(
    fold_dir: Path,
    *,
    ts: Sequence[float],
    device: str = "cpu",
    which: str = "best",
    progress: bool = True,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Evaluate the model and the prior on one fold's test images.

    Returns:
        dict with ``fold``, ``checkpoint``, ``test_images``, ``count`` (K,), ``model`` and ``prior``
        (each ``{"iou": (K, T), "ior": (K, T)}`` accuracy), ``auroc`` (K,), ``rows`` (per-box dicts
        with ``image_id`` and ``fold``), ``prior_info``.
    """
    from cxrloc.checkpoint import load_model, resolve_checkpoint
    from cxrloc.data.prepared import Prepared
    from cxrloc.inference.batch import predict_prepared

    run = read_run_json(fold_dir)
    prepared = Prepared.open(run["prepared_dir"])
    ckpt = resolve_checkpoint(fold_dir, which=which)
    model, _meta, cfg = load_model(fold_dir, device=device, which=which)
    test_ids = [str(i) for i in run["test_ids"]]
    if not test_ids:
        raise CxrlocError(f"{fold_dir / 'run.json'} lists no test image.")
    fold = run.get("fold", fold_dir.name.split("_", 1)[-1])
    z = predict_prepared(
        model,
        prepared,
        test_ids,
        image_size=cfg.image_size,
        device=device,
        batch_size=batch_size,
        progress=progress,
        description=f"Evaluating {fold_dir.name}",
    )
    boxes = [prepared.boxes(i) for i in test_ids]
    labels = np.stack([prepared.labels(i) for i in test_ids])
    table = localization_table(z, boxes, ts)

    # The prior sees the same fold's training boxes (never a test box).
    train_ids = [str(i) for i in run["train_ids"]] + [str(i) for i in run.get("val_ids", [])]
    train_boxes = boxes_by_class(prepared.boxes(i) for i in train_ids)
    prior = fit_prior(train_boxes, z.shape[-1])
    prior_table = localization_table(prior.predict(len(test_ids)), boxes, ts)
    prior_t = per_t_prior_accuracy(train_boxes, z.shape[-1], boxes, ts)

    rows = []
    for row, prow in zip(table["rows"], prior_table["rows"], strict=True):
        row = dict(row)
        row["image_id"] = test_ids[row["image_index"]]
        row["fold"] = fold
        row["prior_iou"], row["prior_ior"] = prow["iou"], prow["ior"]
        rows.append(row)
    return {
        "fold": fold,
        "fold_dir": str(fold_dir),
        "checkpoint": str(ckpt),
        "test_images": len(test_ids),
        "count": table["count"],
        "model": table["accuracy"],
        "prior": prior_table["accuracy"],
        "prior_t": prior_t["accuracy"],
        "auroc": auroc_per_class(image_scores(z), labels),
        "rows": rows,
        "prior_info": prior.to_json(),
        "prior_t_q": prior_t["q"],
    }


def per_t_prior_accuracy(
    train_boxes: dict[int, list[tuple[float, ...]]],
    patch_grid: int,
    boxes: Sequence[Sequence[tuple[int, float, float, float, float]]],
    ts: Sequence[float],
) -> dict[str, Any]:
    """Accuracy of the per-T prior (q chosen on the training boxes for each T) on ``boxes``.

    Returns:
        ``{"accuracy": {"iou": (K, T), "ior": (K, T)}, "q": {T: [q_k or None]}}``: column j of each
        array is the prior fitted for ``ts[j]``, scored at ``ts[j]``.
    """
    priors = fit_prior_per_t(train_boxes, patch_grid, ts)
    acc = {m: np.full((len(CLASSES), len(ts)), np.nan) for m in METRICS}
    for j, t in enumerate(ts):
        table = localization_table(priors[float(t)].predict(len(boxes)), boxes, [t])
        for m in METRICS:
            acc[m][:, j] = table["accuracy"][m][:, 0]
    q = {f"{t:g}": [_nan_to_none(float(v)) for v in priors[float(t)].q] for t in ts}
    return {"accuracy": acc, "q": q}


def summarise(folds: list[dict[str, Any]], ts: Sequence[float]) -> dict[str, Any]:
    """Mean and std over folds of per-class accuracies, of the boxed-class means, and of the AUROC."""
    out: dict[str, Any] = {}
    for method in METHODS:
        out[method] = {}
        for m in METRICS:
            per = np.stack([f[method][m] for f in folds])  # (F, K, T)
            means = np.stack([_boxed_mean(f[method][m], f["count"]) for f in folds])  # (F, T)
            pc_mean, pc_std = _mean_std(per)
            b_mean, b_std = _mean_std(means)
            out[method][m] = {
                "per_class_mean": pc_mean,
                "per_class_std": pc_std,
                "boxed_mean": b_mean,
                "boxed_mean_std": b_std,
                "per_fold_boxed_mean": means,
            }
    a_mean, a_std = _mean_std(np.stack([f["auroc"] for f in folds]))
    out["auroc"] = {"mean": a_mean, "std": a_std}
    out["count"] = np.sum([f["count"] for f in folds], axis=0)
    return out


def _fmt(v: float, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{v:.3f}"
    return f"{v:.3f}±{std:.3f}"


def _accuracy_rows(
    summary: dict[str, Any], ts: Sequence[float], metric: str, with_std: bool = True
) -> list[tuple[str, str, list[str]]]:
    """(method, T, cells for the 8 boxed classes + mean) for one metric, paper rows at T=0.1."""
    rows: list[tuple[str, str, list[str]]] = []
    for j, t in enumerate(ts):
        for method in METHODS:
            label = LABELS[method]
            s = summary[method][metric]
            cells = [_fmt(s["per_class_mean"][k, j], s["per_class_std"][k, j] if with_std else None) for k in BOXED]
            cells.append(_fmt(s["boxed_mean"][j], s["boxed_mean_std"][j] if with_std else None))
            rows.append((label, f"{t:g}", cells))
        if abs(t - PAPER_T) < 1e-9:
            for label, values in PAPER_TABLE1[metric].items():
                rows.append((label, f"{t:g}", [f"{v:.3f}" for v in values] + [f"{np.mean(values):.3f}"]))
    return rows


def _markdown(summary: dict[str, Any], ts: Sequence[float], metrics: Sequence[str], n_folds: int, info: str) -> str:
    buf = io.StringIO()
    buf.write(f"# Evaluation\n\n{info}\n\nMean ± sample std over {n_folds} fold(s); 'mean' = mean over the ")
    buf.write("8 boxed classes. Paper rows: Rozenberg et al. 2019 Table 1 (T = 0.1, 0% unannotated).\n\n")
    head = ["method", "T", *[SHORT[c] for c in BOXED_CLASSES], "mean"]
    for m in metrics:
        buf.write(f"## {m.upper()} accuracy\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        for method, t, cells in _accuracy_rows(summary, ts, m):
            buf.write(f"| {method} | {t} | " + " | ".join(cells) + " |\n")
        buf.write("\n")
    buf.write("## AUROC of 1'z (model)\n\n| class | AUROC |\n|---|---|\n")
    for k, c in enumerate(CLASSES):
        buf.write(f"| {c} | {_fmt(summary['auroc']['mean'][k], summary['auroc']['std'][k])} |\n")
    buf.write("\n")
    return buf.getvalue()


def _rich_tables(summary: dict[str, Any], ts: Sequence[float], metrics: Sequence[str]) -> list[Table]:
    tables = []
    # "0.818±0.123" cells need about 150 columns; a narrower terminal gets means only.
    with_std = console.width >= 150
    for m in metrics:
        t = Table(
            title=f"{m.upper()} accuracy ({'mean ± std' if with_std else 'mean'} over folds)",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
        )
        for col in ("method", "T", *[SHORT[c] for c in BOXED_CLASSES], "mean"):
            if col == "method":
                t.add_column(col, justify="left", overflow="fold")
            else:  # numbers are never cut: an 80-column terminal fits them
                t.add_column(col, justify="right", no_wrap=True, min_width=3 if col == "T" else 5)
        for method, tt, cells in _accuracy_rows(summary, ts, m, with_std):
            style = "bold" if method == "model" else ("dim" if method.startswith("paper") else None)
            t.add_row(method, tt, *cells, style=style)
        tables.append(t)
    a = Table(title="AUROC of 1'z")
    a.add_column("class")
    a.add_column("AUROC", justify="right")
    for k, c in enumerate(CLASSES):
        a.add_row(c, _fmt(summary["auroc"]["mean"][k], summary["auroc"]["std"][k]))
    tables.append(a)
    return tables


def _csv(summary: dict[str, Any], ts: Sequence[float], metrics: Sequence[str], n_folds: int) -> str:
    records = []
    for method in METHODS:
        for m in metrics:
            s = summary[method][m]
            for j, t in enumerate(ts):
                for k in BOXED:
                    records.append(
                        (
                            method,
                            m,
                            t,
                            CLASSES[k],
                            s["per_class_mean"][k, j],
                            s["per_class_std"][k, j],
                            n_folds,
                            int(summary["count"][k]),
                        )
                    )
                records.append(
                    (
                        method,
                        m,
                        t,
                        "mean",
                        s["boxed_mean"][j],
                        s["boxed_mean_std"][j],
                        n_folds,
                        int(sum(summary["count"][k] for k in BOXED)),
                    )
                )
    for m in metrics:
        for label, values in PAPER_TABLE1[m].items():
            for k, v in enumerate(values):
                records.append((label, m, PAPER_T, CLASSES[k], v, np.nan, np.nan, np.nan))
            records.append((label, m, PAPER_T, "mean", float(np.mean(values)), np.nan, np.nan, np.nan))
    for k, c in enumerate(CLASSES):
        records.append(
            ("model", "auroc", np.nan, c, summary["auroc"]["mean"][k], summary["auroc"]["std"][k], n_folds, np.nan)
        )
    df = pd.DataFrame(records, columns=["method", "metric", "T", "class", "mean", "std", "folds", "boxes"])
    return df.to_csv(index=False, float_format="%.6g")


def _per_image_csv(rows: list[dict[str, Any]], ts: Sequence[float]) -> str:
    cols = ["fold", "image_id", "box_index", "class", "x0", "y0", "x1", "y1", "region_patches", "iou", "ior"]
    records = []
    for r in rows:
        rec = {c: r[c] for c in cols}
        for m in METRICS:
            for t in ts:
                rec[f"correct_{m}@{t:g}"] = int(bool(is_correct(r[m], t)))
        rec["prior_iou"], rec["prior_ior"] = r["prior_iou"], r["prior_ior"]
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    if df.empty:
        df = pd.DataFrame(columns=cols)
    return df.to_csv(index=False, float_format="%.6g")


def _jsonable(summary: dict[str, Any], folds: list[dict[str, Any]], ts: Sequence[float]) -> dict[str, Any]:
    def per_class(arr: np.ndarray) -> dict[str, list[float | None]]:
        return {CLASSES[k]: [_nan_to_none(float(v)) for v in arr[k]] for k in range(arr.shape[0])}

    def vec(arr: np.ndarray) -> list[float | None]:
        return [_nan_to_none(float(v)) for v in arr]

    summ: dict[str, Any] = {}
    for method in METHODS:
        summ[method] = {
            m: {
                "per_class_mean": per_class(summary[method][m]["per_class_mean"]),
                "per_class_std": per_class(summary[method][m]["per_class_std"]),
                "boxed_mean": vec(summary[method][m]["boxed_mean"]),
                "boxed_mean_std": vec(summary[method][m]["boxed_mean_std"]),
            }
            for m in summary[method]
        }
    summ["auroc"] = {
        "mean": dict(zip(CLASSES, vec(summary["auroc"]["mean"]), strict=True)),
        "std": dict(zip(CLASSES, vec(summary["auroc"]["std"]), strict=True)),
    }
    summ["boxes"] = dict(zip(CLASSES, [int(c) for c in summary["count"]], strict=True))
    per_fold = [
        {
            "fold": f["fold"],
            "checkpoint": f["checkpoint"],
            "test_images": f["test_images"],
            "boxes": dict(zip(CLASSES, [int(c) for c in f["count"]], strict=True)),
            "model": {m: per_class(f["model"][m]) for m in METRICS},
            "prior": {m: per_class(f["prior"][m]) for m in METRICS},
            "prior_t": {m: per_class(f["prior_t"][m]) for m in METRICS},
            "model_boxed_mean": {m: vec(_boxed_mean(f["model"][m], f["count"])) for m in METRICS},
            "prior_boxed_mean": {m: vec(_boxed_mean(f["prior"][m], f["count"])) for m in METRICS},
            "prior_t_boxed_mean": {m: vec(_boxed_mean(f["prior_t"][m], f["count"])) for m in METRICS},
            "auroc": dict(zip(CLASSES, vec(f["auroc"]), strict=True)),
            "prior_fit": f["prior_info"],
            "prior_t_q": f["prior_t_q"],
        }
        for f in folds
    ]
    return {
        "summary": summ,
        "per_fold": per_fold,
        "paper_table1": {
            "T": PAPER_T,
            "unannotated": 0.0,
            **{
                m: {label: dict(zip(BOXED_CLASSES, v, strict=True)) for label, v in rows.items()}
                for m, rows in PAPER_TABLE1.items()
            },
        },
    }


def evaluate(
    run_dir: str | Path,
    *,
    metrics: Sequence[str] = METRICS,
    ts: Sequence[float] = DEFAULT_TS,
    fold: int | str | None = None,
    device: str = "cpu",
    which: str = "best",
    progress: bool = True,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run (one or every fold) and write ``eval/`` in the run folder.

    Args:
        run_dir: ``RUN_DIR`` (with ``fold_K/``) or a single fold folder.
        metrics: subset of ``("iou", "ior")`` shown in the tables (both are always computed).
        ts: thresholds T.
        fold: ``None`` or ``"all"`` (every fold found) or a fold index.
        device: torch device.
        which: checkpoint, ``best`` or ``last``.
        progress: progress bars.
        batch_size: images per forward pass.
        out_dir: where to write (default ``RUN_DIR/eval``).

    Returns:
        The content of ``results.json`` plus ``"out_dir"``.
    """
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise CxrlocError(f"Unknown metric {bad[0] if bad else '(none)'}: use iou, ior or both.")
    ts = tuple(float(t) for t in ts)
    if not ts or any(not 0.0 < t <= 1.0 for t in ts):
        raise CxrlocError(f"Every --t must be in (0, 1], got {list(ts)}.")
    run_dir = Path(run_dir)
    dirs = fold_dirs(run_dir, fold)
    folds = [
        evaluate_fold(d, ts=ts, device=device, which=which, progress=progress, batch_size=batch_size) for d in dirs
    ]
    summary = summarise(folds, ts)
    out = Path(out_dir) if out_dir is not None else run_dir / "eval"
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = f"Run `{run_dir}`, checkpoint `{which}`, folds {[f['fold'] for f in folds]}, T = {list(ts)}, {date}."
    result = {
        "run_dir": str(run_dir),
        "which": which,
        "folds": [f["fold"] for f in folds],
        "ts": list(ts),
        "metrics": list(metrics),
        "date": date,
        "region_rule": "z >= 0.5",
        "std": "sample standard deviation over folds (ddof=1); null with one fold",
        **_jsonable(summary, folds, ts),
    }
    rows = [r for f in folds for r in f["rows"]]
    write_json_atomic(out / "results.json", result)
    write_text_atomic(out / "results.csv", _csv(summary, ts, metrics, len(folds)))
    write_text_atomic(out / "results.md", _markdown(summary, ts, metrics, len(folds), info))
    write_text_atomic(out / "per_image.csv", _per_image_csv(rows, ts))
    for table in _rich_tables(summary, ts, metrics):
        console.print(table)
    result["out_dir"] = str(out)
    return result
