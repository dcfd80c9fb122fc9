"""``report.html``: one self-contained page of an evaluation (no network: inline SVG and base64 PNG).

Made by :func:`cxrloc.evaluation.evaluate.evaluate` beside ``results.{json,csv,md}``, from the same
``results.json`` content, per-box rows and per-image-and-class rows, so the page and the files cannot
disagree. Sections (each an element with a fixed ``id``, which ``tests/test_html_report.py`` checks):

- ``accuracy``: the accuracy tables of ``results.md`` (model, both priors, the paper's rows on NIH data);
- ``classification``: the operating point, classes called present per image against labelled
  findings, per-class AUROC, sensitivity and specificity;
- ``accuracy-vs-t``: mean accuracy over the boxed classes against T (0.05 to 1) for the model and the
  prior (one q), from the per-box IoU / IoR pooled over folds, with the per-T prior at the T evaluated;
- ``roc``: one ROC curve of ``1'z`` per class (images pooled over folds), the operating point marked;
- ``reliability``: one reliability diagram per class (calibrated runs only): the mean probability
  against the fraction of positive images, in ten bins, with the image count of each bin;
- ``gallery``: per boxed class, test images with their ground-truth boxes and the predicted region
  (:func:`cxrloc.inference.overlay.render_overlay`): the best IoU, the worst IoU among images where the
  class was called present, and the images where it was missed (boxed but not called present).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cxrloc.evaluation.metrics import METRICS, is_correct
from cxrloc.evaluation.report import accuracy_rows, classification_note, classification_rows, columns_note, short_names

CURVE_TS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
"""The T of the accuracy-against-T curves."""

COLORS: dict[str, str] = {"model": "#0072B2", "prior": "#E69F00", "prior_t": "#009E73", "chance": "#999999"}
"""Okabe-Ito colours of the curves (colour-blind safe)."""

RELIABILITY_BINS: int = 10

GALLERY_MIN_SIDE: int = 320
"""Gallery pictures are enlarged to this shorter side (cache images are small)."""

MISSED_SHOWN: int = 2
"""Missed images shown per class."""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.model td{font-weight:600}
tr.paper td{color:#777}.note{font-size:13px;color:#444;max-width:1100px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.cell{font-size:12px}
figure{margin:0;display:inline-block;vertical-align:top}figcaption{font-size:12px;max-width:360px}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start;margin-bottom:10px}
.kind{font-weight:600}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


# --------------------------------------------------------------------------- SVG charts


def svg_chart(
    series: Sequence[dict[str, Any]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xlim: tuple[float, float] = (0.0, 1.0),
    ylim: tuple[float, float] = (0.0, 1.0),
    width: int = 300,
    height: int = 240,
    diagonal: bool = False,
    legend_bottom: bool = False,
) -> str:
    """An inline SVG chart. Each series: ``label``, ``color``, ``points`` [(x, y)], ``kind`` (``line``,
    ``dots`` or ``step``), optional ``sizes`` (dot radii) and ``dash``."""
    left, right, top, bottom = 42, 10, 22, 36
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - xlim[0]) / (xlim[1] - xlim[0]) * pw

    def sy(y: float) -> float:
        return top + ph - (y - ylim[0]) / (ylim[1] - ylim[0]) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart" '
           f'role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="14" font-size="11" font-weight="600">{_e(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = ylim[0] + frac * (ylim[1] - ylim[0])
        x = xlim[0] + frac * (xlim[1] - xlim[0])
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" font-size="10" text-anchor="end">{y:g}</text>')
        out.append(f'<text x="{sx(x):.1f}" y="{top + ph + 13}" font-size="10" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'{_e(xlabel)}</text>')
    out.append(f'<text x="11" y="{top + ph / 2:.0f}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 11 {top + ph / 2:.0f})">{_e(ylabel)}</text>')
    if diagonal:
        out.append(f'<line x1="{sx(xlim[0]):.1f}" y1="{sy(ylim[0]):.1f}" x2="{sx(xlim[1]):.1f}" '
                   f'y2="{sy(ylim[1]):.1f}" stroke="{COLORS["chance"]}" stroke-dasharray="4 3"/>')
    for j, s in enumerate(series):
        pts = [(x, y) for x, y in s["points"] if math.isfinite(x) and math.isfinite(y)]
        color = s["color"]
        if s.get("kind", "line") in ("line", "step") and len(pts) > 1:
            if s.get("kind") == "step":
                path = [pts[0]]
                for p in pts[1:]:
                    path += [(p[0], path[-1][1]), p]
                pts_draw = path
            else:
                pts_draw = pts
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts_draw)
            dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        if s.get("kind") == "dots":
            sizes = s.get("sizes") or [3.5] * len(pts)
            for (x, y), r in zip(pts, sizes, strict=False):
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r:.1f}" fill="{color}"/>')
        if s.get("label"):
            ly = (top + ph - 8 - 13 * (len(series) - 1 - j)) if legend_bottom else (top + 12 + 13 * j)
            out.append(f'<line x1="{left + pw - 92}" x2="{left + pw - 78}" y1="{ly - 4}" y2="{ly - 4}" '
                       f'stroke="{color}" stroke-width="3"/>')
            out.append(f'<text x="{left + pw - 74}" y="{ly}" font-size="10">{_e(s["label"])}</text>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- computations


def accuracy_curve(values: Sequence[Sequence[float]], ts: Sequence[float] = CURVE_TS) -> list[float]:
    """Mean over classes of the fraction of boxes with ``value >= T``, for each T; ``values`` holds one
    list of per-box IoU (or IoR) per class (a class without boxes is left out)."""
    used = [np.asarray(v, float) for v in values if len(v)]
    if not used:
        return [math.nan] * len(ts)
    return [float(np.mean([is_correct(v, t).mean() for v in used])) for t in ts]


def roc_points(scores: np.ndarray, labels: np.ndarray) -> list[tuple[float, float]]:
    """The ROC curve ``(false positive rate, true positive rate)`` of ``scores`` against 0/1 ``labels``,
    one point per distinct score (ties move both rates at once), from (0, 0) to (1, 1)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels) > 0.5
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return []
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    return [(0.0, 0.0)] + [(float(fp[i] / neg), float(tp[i] / pos)) for i in last]


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, bins: int = RELIABILITY_BINS
) -> list[tuple[float, float, int]]:
    """``(mean probability, fraction positive, count)`` of each non-empty bin of equal width in [0, 1]."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, float)
    idx = np.minimum((probs * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append((float(probs[sel].mean()), float(labels[sel].mean()), int(sel.sum())))
    return out


def class_limits(meta: dict[str, Any], num_classes: int) -> list[float | None]:
    """Each class's threshold at the model's operating point: the calibrated probability threshold, or
    ``tau_hat`` on ``1'z`` for an uncalibrated model (``None`` for a class never called present)."""
    from cxrloc.calibration import Calibration
    from cxrloc.thresholds import Thresholds

    if meta.get("calibration"):
        t = Calibration.from_json(meta["calibration"], "the model's calibration").thresholds()
    else:
        t = Thresholds.from_json(meta["thresholds"], classes=meta.get("classes")).tau_hat
    t = np.asarray(t, float)
    return [float(v) if math.isfinite(v) else None for v in t[:num_classes]]


# --------------------------------------------------------------------------- sections


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row, cls in zip(rows, list(classes) + [""] * (len(rows) - len(classes)), strict=False):
        attr = f' class="{cls}"' if cls else ""
        out.append(f"<tr{attr}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _accuracy_section(result: dict[str, Any]) -> str:
    boxed = list(result.get("boxed_classes", []))
    short = short_names(boxed)
    head = ["method", "T", *[short[c] for c in boxed], "mean"]
    parts = [f'<section id="accuracy"><h2>Localization accuracy</h2><p class="note">{_e(columns_note(result))} '
             "Mean ± sample std over folds; 'prior' chooses one coverage level q for all T, 'prior per-T' the best "
             "q for each T (both fitted on the training boxes).</p>"]
    for m in result["metrics"]:
        rows = accuracy_rows(result, m)
        parts.append(f"<h3>{m.upper()} accuracy</h3>")
        parts.append(_table(head, [[method, t, *cells] for method, t, cells in rows],
                            ["model" if r[0] == "model" else ("paper" if r[0].startswith("paper") else "")
                             for r in rows]))
    parts.append("</section>")
    return "".join(parts)


def _classification_section(result: dict[str, Any]) -> str:
    rows = classification_rows(result)
    return ('<section id="classification"><h2>Classification at the operating point</h2>'
            f'<p class="note">{_e(classification_note(result))}</p>'
            + _table(["class", "positives", "AUROC of 1'z", "sensitivity", "specificity"],
                     [[c, p, *cells] for c, p, cells in rows]) + "</section>")


def _curves_section(result: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    boxed = list(result.get("boxed_classes", []))
    charts = []
    for m in METRICS:
        per = {"model": [[r[m] for r in rows if r["class"] == c] for c in boxed],
               "prior": [[r[f"prior_{m}"] for r in rows if r["class"] == c] for c in boxed]}
        series = [{"label": "model", "color": COLORS["model"], "kind": "line",
                   "points": list(zip(CURVE_TS, accuracy_curve(per["model"]), strict=True))},
                  {"label": "prior", "color": COLORS["prior"], "kind": "line", "dash": "5 3",
                   "points": list(zip(CURVE_TS, accuracy_curve(per["prior"]), strict=True))}]
        pt = result["summary"]["prior_t"][m]["boxed_mean"]
        series.append({"label": "prior per-T", "color": COLORS["prior_t"], "kind": "dots",
                       "points": [(t, math.nan if v is None else v) for t, v in zip(result["ts"], pt, strict=True)]})
        charts.append(svg_chart(series, title=f"{m.upper()} accuracy against T (mean of boxed classes)",
                                xlabel="T", ylabel="accuracy", xlim=(0.0, 1.0), width=440, height=300))
    return ('<section id="accuracy-vs-t"><h2>Accuracy against T</h2><p class="note">Fraction of test boxes '
            "whose region reaches IoU (IoR) >= T, per boxed class, averaged over the boxed classes; boxes pooled "
            "over folds (the tables average fold by fold, so they can differ slightly). The per-T prior is "
            f"fitted for each T evaluated only.</p><div class=\"grid\">{''.join(charts)}</div></section>")


def _roc_section(result: dict[str, Any], class_rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
    classes = list(result["classes"])
    auroc = result["summary"]["auroc"]["mean"]
    roc, rel = [], []
    calibrated = any(r.get("probability") is not None for r in class_rows)
    for c in classes:
        rs = [r for r in class_rows if r["class"] == c and r.get("label") is not None]
        if not rs:
            continue
        y = np.array([r["label"] for r in rs], float)
        s = np.array([r["score"] for r in rs], float)
        present = np.array([r["present"] for r in rs], bool)
        pts = roc_points(s, y)
        if not pts:
            continue
        pos, neg = y > 0.5, y < 0.5
        op = (float(present[neg].mean()), float(present[pos].mean()))
        roc.append(svg_chart(
            [{"color": COLORS["model"], "kind": "line", "points": pts},
             {"label": "operating point", "color": "#D55E00", "kind": "dots", "points": [op], "sizes": [5]}],
            title=f"{c}: AUROC {_f(auroc.get(c), 2)} ({int(pos.sum())}+/{int(neg.sum())}-)",
            xlabel="false positive rate", ylabel="true positive rate", diagonal=True, width=290, height=240,
            legend_bottom=True))
        if calibrated:
            p = np.array([r["probability"] for r in rs], float)
            bins = reliability_bins(p, y)
            rel.append(svg_chart(
                [{"color": COLORS["model"], "kind": "line", "points": [(b[0], b[1]) for b in bins]},
                 {"color": COLORS["model"], "kind": "dots", "points": [(b[0], b[1]) for b in bins],
                  "sizes": [2.0 + 6.0 * math.sqrt(b[2] / len(p)) for b in bins]}],
                title=f"{c} ({len(p)} images)", xlabel="mean predicted probability", ylabel="fraction positive",
                diagonal=True, width=290, height=240))
    roc_html = ('<section id="roc"><h2>ROC curves</h2><p class="note">One curve per class: the raw score 1\'z '
                "of every test image, pooled over folds (the table's AUROC is the mean over folds); the dot is the "
                "operating point's false and true positive rate.</p>"
                f"<div class=\"grid\">{''.join(roc)}</div></section>")
    if calibrated:
        body = ('<p class="note">Mean calibrated probability against the fraction of images labelled positive, in '
                f"{RELIABILITY_BINS} bins of equal width (dot area: images in the bin); on the diagonal a "
                f"probability means what it says.</p><div class=\"grid\">{''.join(rel)}</div>")
    else:
        body = ('<p class="note">The run is not calibrated (no probabilities): run <code>cxrloc calibrate '
                "RUN_DIR</code>, then evaluate again.</p>")
    return roc_html, f'<section id="reliability"><h2>Reliability diagrams</h2>{body}</section>'


def _png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gallery_picks(rows: Sequence[dict[str, Any]], boxed: Sequence[str]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Per boxed class: ``("best", row)`` (highest IoU), ``("worst", row)`` (lowest IoU among boxes whose class
    was called present) and up to :data:`MISSED_SHOWN` ``("missed", row)`` (boxes whose class was not called
    present, the least probable first); one image is shown once per class."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for c in boxed:
        rs = [r for r in rows if r["class"] == c]
        if not rs:
            continue
        picks: list[tuple[str, dict[str, Any]]] = []
        seen: set[tuple[Any, str]] = set()

        def take(kind: str, r: dict[str, Any], picks: list = picks, seen: set = seen) -> None:
            key = (r["fold"], r["image_id"])
            if key not in seen:
                seen.add(key)
                picks.append((kind, r))

        take("best", max(rs, key=lambda r: (r["iou"], r["ior"])))
        called = [r for r in rs if r.get("present")]
        if called:
            take("worst", min(called, key=lambda r: (r["iou"], r["ior"])))
        missed = sorted((r for r in rs if not r.get("present")), key=lambda r: r.get("probability") or r["score"])
        for r in missed[:MISSED_SHOWN]:
            take("missed", r)
        out[c] = picks
    return out


def _gallery_section(result: dict[str, Any], rows: Sequence[dict[str, Any]], folds: Sequence[dict[str, Any]]) -> str:
    from cxrloc.inference.overlay import percent, render_overlay

    by_fold = {f["fold"]: f for f in folds}
    classes = list(result["classes"])
    parts = ['<section id="gallery"><h2>Gallery</h2><p class="note">Per boxed class: the test box the model '
             "localizes best (highest IoU), the worst among images where the class was called present, and images "
             "where it was missed (boxed but not called present). Each picture shows that class's predicted region "
             "(outline and light fill, its probability beside it) and the image's ground-truth boxes (GT).</p>"]
    for c, picks in gallery_picks(rows, result.get("boxed_classes", [])).items():
        k = classes.index(c)
        figs = []
        for kind, r in picks:
            f = by_fold.get(r["fold"])
            if f is None or "z" not in f:
                continue
            i = f["ids"].index(r["image_id"])
            data = f["data"]
            img = data.image(r["image_id"]).astype(np.float32) / 255.0
            names = list(data.classes)
            gts = [(names[b[0]], *b[1:]) for b in data.boxes(r["image_id"])]
            probs = f["probs"][i] if f.get("probs") is not None else None
            called = [j for j in range(len(f["limits"])) if f["present"][i, j]]
            pic = render_overlay(img, f["z"][i], [k], classes=f["run_classes"], probabilities=probs,
                                 scores=list(f["scores"][i]), gt_boxes=gts, called=called, thresholds=f["limits"],
                                 min_side=GALLERY_MIN_SIDE, legend=False)
            p = percent(r["probability"]) if r.get("probability") is not None else f"1'z {r['score']:.1f}"
            others = [f"{f['run_classes'][j]} {percent(probs[j]) if probs is not None else ''}".strip()
                      for j in called if j != k]
            caption = (f'<span class="kind">{kind}</span> · fold {r["fold"]} · {_e(r["image_id"])} · {_e(c)} {p}'
                       f'{" (present)" if r.get("present") else " (not present)"} · IoU {_f(r["iou"], 2)} · IoR '
                       f'{_f(r["ior"], 2)}' + (f'<br>also present: {_e(", ".join(others))}' if others else ""))
            figs.append(f'<figure class="{kind}"><img alt="{_e(c)} {kind} {_e(r["image_id"])}" '
                        f'src="{_png(pic)}"><figcaption>{caption}</figcaption></figure>')
        parts.append(f'<h3>{_e(c)}</h3><div class="row">{"".join(figs) or "<p>no test image</p>"}</div>')
    parts.append("</section>")
    return "".join(parts)


def html_report(
    result: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    class_rows: Sequence[dict[str, Any]],
    folds: Sequence[dict[str, Any]],
    info: str,
) -> str:
    """The page's text. ``folds``: :func:`cxrloc.evaluation.evaluate.evaluate_fold`'s dicts (their ``z``,
    ``ids``, ``data``, ``scores``, ``probs``, ``present``, ``limits`` and ``run_classes`` draw the gallery)."""
    roc, rel = _roc_section(result, class_rows)
    body = [
        f"<h1>cxrloc evaluation</h1><p class=\"note\">{_e(info.replace('`', ''))}</p>",
        '<nav><a href="#accuracy">accuracy</a> · <a href="#classification">classification</a> · '
        '<a href="#accuracy-vs-t">accuracy against T</a> · <a href="#roc">ROC</a> · '
        '<a href="#reliability">reliability</a> · <a href="#gallery">gallery</a></nav>',
        _accuracy_section(result),
        _classification_section(result),
        _curves_section(result, rows),
        roc,
        rel,
        _gallery_section(result, rows, folds),
    ]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>cxrloc evaluation</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
