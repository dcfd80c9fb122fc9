"""The paper's evaluation of a trained run, beside the data-free priors and the paper's Table 1.

For each fold: ``z`` of the fold's test images (``run.json`` ``test_ids``; or its validation
images with ``split="val"``), IoU / IoR accuracy at each T per class
(:mod:`cxrloc.evaluation.metrics`), both priors fitted on the same fold's training boxes and
evaluated the same way, the per-class AUROC of ``1'z`` and, at the model's operating point
(``calibration.json``, :mod:`cxrloc.calibration`; ``1'z >= tau_hat`` for an uncalibrated model),
per-class sensitivity and specificity and the number of classes called present per image against
the number of labelled findings. Then mean and standard deviation over folds. The reports
(``results.{json,csv,md}``, ``per_image.csv``, ``per_image_classes.csv`` and the terminal tables) are
made by :mod:`cxrloc.evaluation.report` from the ``results.json`` content built here.

**An external test set** (``data=PREPARED_DIR``): each fold's model (or the one fold asked for)
scores every boxed image of another prepared folder, whatever its folds (an external set is all
test), with the same metrics; the priors are still fitted on the run's own training boxes. Classes are matched
by name: the report's classes are the run's, then the test data's classes the run does not know;
a class the run does not know, or that has no box (no label) in the test data, is n/a.

The "mean" column averages the *boxed classes* that have a test box: NIH's 8 (the paper's) for NIH
data, else the classes that carry boxes in the run's or the test data (``classes.json``). The
paper's Table 1 is kept beside NIH results only when every fold's test boxes cover all of NIH's 8
**Two geometries** (:data:`cxrloc.geometry.GEOMETRIES`): every box is scored ``exact`` (today's
default) and ``grid`` (the box rasterised onto the patch grid as in the public Li et al. code, the
geometry of published tables); both are in every file. Threshold fitting and the priors' choice of
q stay on the exact geometry (they are cxrloc's, not the paper's).

One fold is evaluated by :mod:`cxrloc.evaluation.fold_evaluation` and the folds are summarised by
:mod:`cxrloc.evaluation.summary`; their public names are importable from here too.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrloc.classes import is_nih
from cxrloc.data.prepared import Prepared
from cxrloc.evaluation.fold_evaluation import (
    SPLITS,
    ClassMatch,
    check_external,
    classification,
    decisions,
    evaluate_fold,
    per_t_prior_accuracy,
)
from cxrloc.evaluation.html_report import html_report
from cxrloc.evaluation.metrics import METRICS
from cxrloc.evaluation.report import write_reports
from cxrloc.evaluation.summary import boxed_class_names, results_json, summarise
from cxrloc.rundir import FoldDir, RunDir
from cxrloc.utils import CxrlocError, check_writable_dir, read_json

__all__ = [
    "DEFAULT_TS", "SETTINGS", "SPLITS", "ClassMatch", "boxed_class_names", "check_external", "check_same_settings",
    "classification", "decisions", "evaluate", "evaluate_fold", "per_t_prior_accuracy", "results_json", "summarise",
]

DEFAULT_TS: tuple[float, ...] = (0.1, 0.3, 0.5)

GEOMETRY_RULE: dict[str, str] = {
    "exact": "exact rectangle areas of the region (a union of patches) and the box",
    "grid": "the box rasterised as in the public Li et al. code (romanovar/evaluation_MIL, "
            "translate_on_patches + make_label_matrix_localization_v2: corners rounded to the nearest "
            "grid line, the row and column at the max corner included), IoU / IoR counted in patches",
    "fitting": "threshold fitting and the priors' q use the exact geometry",
}
"""``results.json``'s ``geometry_rule``: how each geometry scores a box."""


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
    split: str = "test",
    tta: int = 1,
    data: str | Path | None = None,
    html: bool = True,
) -> dict[str, Any]:
    """Evaluate a run (one or every fold) and write its reports.

    Args:
        run_dir: ``RUN_DIR`` (with ``fold_K/``) or a single fold folder.
        metrics: subset of ``("iou", "ior")`` shown in the tables (both are always computed).
        ts: thresholds T.
        fold: ``None`` or ``"all"`` (every fold found) or a fold index.
        device: torch device.
        which: checkpoint, ``best`` or ``last``.
        progress: progress bars.
        batch_size: images per forward pass.
        out_dir: where to write (default ``RUN_DIR/eval``, ``RUN_DIR/eval_val`` for ``split="val"``,
            ``RUN_DIR/eval_on_NAME`` for an external test set ``data`` named NAME; then ``_foldN`` when
            one fold of several is evaluated, ``_last`` for the last checkpoint, ``_ttaN`` for test-time
            augmentation, so evaluations with other options never share a folder). A folder that holds
            an evaluation made with other options (:data:`SETTINGS`) is never replaced:
            :func:`check_same_settings`.
        split: ``test`` (the fold's test images) or ``val`` (its validation images).
        tta: test-time views averaged (1 = none; :func:`cxrloc.inference.batch.forward_tta`).
        data: an external test set, a prepared folder: each fold's model (or fold ``fold``'s) on every
            boxed image of it, whatever its folds (see the module docstring).
        html: also write ``report.html`` (:mod:`cxrloc.evaluation.html_report`).

    Returns:
        The content of ``results.json`` plus ``"out_dir"`` and ``"rows"`` (per-box results).
    """
    metrics, ts = _checked_options(metrics, ts, data, split)
    run = RunDir(Path(run_dir))
    fold_dirs = run.folds(fold)
    test_data = Prepared.open(data) if data is not None else None
    if out_dir is None:
        out = _default_out(run, fold, fold_dirs, test_data, split=split, tta=tta, which=which)
    else:
        out = Path(out_dir)
    check_writable_dir(out, "evaluation folder")
    settings = {"split": split, "data": None if test_data is None else str(test_data.root.resolve()),
                "folds": [d.read_run().get("fold") for d in fold_dirs], "which": which, "tta": tta, "ts": list(ts)}
    check_same_settings(out, settings, explicit=out_dir is not None)
    folds = [
        evaluate_fold(d, ts=ts, device=device, which=which, progress=progress, batch_size=batch_size, split=split,
                      tta=tta, data=test_data)
        for d in fold_dirs
    ]
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    result = _results(run, folds, ts=ts, metrics=metrics, settings=settings, which=which, split=split, tta=tta,
                      test_data=test_data, date=date)
    images = f"{split} images" if test_data is None else f"external test set `{test_data.root}` (every boxed image)"
    info = (f"Run `{run.path}`, checkpoint `{which}`, {images}, folds {[f['fold'] for f in folds]}, "
            f"T = {list(ts)}{f', {tta} test-time views' if tta > 1 else ''}, {date}.")
    rows = [r for f in folds for r in f["rows"]]
    class_rows = [r for f in folds for r in f["class_rows"]]
    page = {out / "report.html": html_report(result, rows, class_rows, folds, info)} if html else {}
    write_reports(result, rows, out, info, class_rows=class_rows, extra=page)
    return {**result, "out_dir": str(out), "rows": rows}


def _checked_options(
    metrics: Sequence[str], ts: Sequence[float], data: str | Path | None, split: str
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``(metrics, ts)`` as tuples, once checked.

    Raises:
        CxrlocError: an unknown metric or none, a T outside (0, 1], or ``data`` with the validation split.
    """
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise CxrlocError(f"Unknown metric {bad[0] if bad else '(none)'}: use iou, ior or both.")
    ts = tuple(float(t) for t in ts)
    if not ts or any(not 0.0 < t <= 1.0 for t in ts):
        raise CxrlocError(f"Every --t must be in (0, 1], got {list(ts)}.")
    if data is not None and split != "test":
        raise CxrlocError("--data scores the boxed images of another prepared folder; --split val is for the run's "
                          "own validation images: use one or the other.")
    return metrics, ts


def _default_out(
    run: RunDir, fold: int | str | None, fold_dirs: Sequence[FoldDir], test_data: Prepared | None, *, split: str,
    tta: int, which: str,
) -> Path:
    """The evaluation folder when ``--out`` is not given (:meth:`cxrloc.rundir.RunDir.eval_dir`)."""
    data_name = None if test_data is None else _safe_name(test_data.root)
    subset = fold not in (None, "all") and len(run.folds("all")) > 1
    return run.eval_dir(split, data_name=data_name, tta=tta,
                        fold=fold_dirs[0].read_run().get("fold") if subset else None, which=which)


def _results(
    run: RunDir, folds: list[dict[str, Any]], *, ts: Sequence[float], metrics: Sequence[str],
    settings: dict[str, Any], which: str, split: str, tta: int, test_data: Prepared | None, date: str,
) -> dict[str, Any]:
    """The ``results.json`` content of an evaluation of ``folds`` (:func:`evaluate_fold`'s dicts)."""
    classes = folds[0]["classes"]
    boxed_names = boxed_class_names(classes, folds[0]["data_format"], folds[0]["boxed_classes"])
    boxed = [classes.index(c) for c in boxed_names]
    nih = folds[0]["data_format"] == "nih" and is_nih(classes)
    # The paper's means are over NIH's 8 classes: its rows are comparable only where every fold's mean is too.
    short = sorted({classes[k] for k in boxed for f in folds
                    if int(f["count"][k]) == 0 or np.all(np.isnan(f["model"]["iou"][k]))}, key=classes.index)
    paper = nih and not short
    summary = summarise(folds, ts, boxed)
    if test_data is not None and len(folds) > 1:
        # Every fold's model scored the same images: their boxes and positives are counted once.
        summary["count"] = np.asarray(folds[0]["count"])
        summary["positives"] = np.asarray(folds[0]["classification"]["positives"])
    result = {
        "run_dir": str(run.path),
        "which": which,
        "split": split,
        "data": None if test_data is None else str(test_data.root),
        "not_in_run": folds[0]["not_in_run"],
        "not_in_data": folds[0]["not_in_data"],
        "tta": tta,
        "folds": [f["fold"] for f in folds],
        "ts": list(ts),
        "metrics": list(metrics),
        "date": date,
        "region_rule": "z >= 0.5",
        "geometry_rule": dict(GEOMETRY_RULE),
        "settings": settings,
        "std": "sample standard deviation over folds (ddof=1); null with one fold",
        **results_json(summary, folds, ts, classes, boxed, paper),
    }
    if nih and not paper:
        result["paper_table1_omitted"] = (
            f"the paper's Table 1 means are over NIH's 8 boxed classes; {', '.join(short)} "
            f"{'has' if len(short) == 1 else 'have'} no test box in {'this' if len(folds) == 1 else 'some'} "
            "fold, so its rows are not shown beside these means")
    return result


SETTINGS: tuple[str, ...] = ("split", "data", "folds", "which", "tta", "ts")
"""The options that change what an evaluation folder holds (``--metric`` and ``--geometry`` only
choose the tables shown: both metrics and both geometries are always saved)."""


def check_same_settings(out: Path, settings: dict[str, Any], *, explicit: bool = False) -> None:
    """Refuse to replace an evaluation in ``out`` that was made with other options (:data:`SETTINGS`).

    Running the same evaluation again replaces it (e.g. after more training). Another one (other
    folds, T, checkpoint, test-time views or test set) must not silently take its place.

    Raises:
        CxrlocError: the folder's ``results.json`` records other options; the message names them and
            says how to keep both (``--out``) or replace it (delete the folder).
    """
    path = out / "results.json"
    if not path.is_file():
        return
    try:
        old = read_json(path, "evaluation results")
    except CxrlocError:
        return  # not an evaluation we can read: write_reports replaces its files as a set
    if not isinstance(old, dict):
        return
    recorded = old.get("settings") or {
        "split": old.get("split", "test"), "data": old.get("data"), "folds": old.get("folds"),
        "which": old.get("which"), "tta": old.get("tta", 1), "ts": old.get("ts"),
    }
    if recorded.get("data") and settings.get("data") and "settings" not in old:
        recorded["data"] = settings["data"] if Path(recorded["data"]).resolve() == Path(settings["data"]) else \
            recorded["data"]
    diffs = [f"{k} {recorded.get(k)!r} -> {settings[k]!r}" for k in SETTINGS if recorded.get(k) != settings[k]]
    if diffs:
        hint = "choose another --out" if explicit else "pass --out DIR to keep both"
        raise CxrlocError(
            f"{out} holds an evaluation made with other options ({'; '.join(diffs)}); {hint}, or delete {out} "
            "to replace it."
        )


def _safe_name(root: Path) -> str:
    """A folder name for ``eval_on_NAME`` from a prepared folder's name (letters, digits, ``._-``)."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in root.resolve().name)
    return name.strip(".") or "data"
