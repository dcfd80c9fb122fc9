"""``report.html`` of ``evaluate``: its structure checked without a browser, on the hand-worked run of
``conftest.write_hand_run`` (z known exactly, see tests/test_evaluate.py), and its computations by hand."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrloc.evaluation.html_report import accuracy_curve, gallery_picks, reliability_bins, roc_points


class _Page(HTMLParser):
    """Sections (by id), images, svg titles, table cells and figures of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.svgs: list[str] = []
        self.cells: list[str] = []
        self.figures: list[tuple[str, str]] = []  # (section h3, figure class)
        self.tags: set[str] = set()
        self.refs: list[str] = []
        self._h3 = ""
        self._in: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        self._in.append(tag)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "img":
            self.imgs.append(a)
        if tag == "svg":
            self.svgs.append(a.get("aria-label", ""))
        if tag == "figure":
            self.figures.append((self._h3, a.get("class", "")))
        for key in ("src", "href"):
            if key in a:
                self.refs.append(a[key])

    def handle_endtag(self, tag: str) -> None:
        while self._in and self._in.pop() != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self._in and self._in[-1] == "td":
            self.cells.append(data)
        if self._in and self._in[-1] == "h3":
            self._h3 = data


def test_report_html_is_self_contained_with_every_section(run_dir: Path) -> None:
    from cxrloc.evaluation.evaluate import evaluate

    result = evaluate(run_dir, ts=(0.1, 0.3, 0.5), fold="all", progress=False)
    text = (Path(result["out_dir"]) / "report.html").read_text()
    page = _Page()
    page.feed(text)
    assert page.sections == ["accuracy", "classification", "accuracy-vs-t", "roc", "reliability", "gallery"]
    # No network: no script, stylesheet link or remote reference; every picture is an inline PNG.
    assert not {"script", "link", "iframe"} & page.tags and "url(" not in text
    assert all(r.startswith(("#", "data:image/png;base64,")) for r in page.refs), page.refs
    for img in page.imgs:
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as pic:
            assert pic.format == "PNG" and min(pic.size) >= 256
    # results.json's numbers in the table: Atelectasis IoU at T = 0.1 over two folds, 5/6 ± (1/3)/sqrt(2).
    assert "0.833±0.236" in page.cells
    # Two charts of accuracy against T; ROC only where a class has both positive and negative test images:
    # Cardiomegaly (a +, b -, constant scores: AUROC 0.5) and Nodule (a + without a box, b -).
    assert sum(s.endswith("accuracy against T (mean of boxed classes)") for s in page.svgs) == 2
    rocs = [s for s in page.svgs if "AUROC" in s]
    assert any(s.startswith("Cardiomegaly: AUROC 0.50 (") for s in rocs) and not any("Atelectasis" in s for s in rocs)
    assert "The run is not calibrated" in text  # no probabilities: no reliability diagram, and it says why
    # Gallery (uncalibrated: present = 1'z >= tau_hat; Atelectasis and Mass everywhere, Cardiomegaly nowhere).
    by_class: dict[str, list[str]] = {}
    for h3, kind in page.figures:
        by_class.setdefault(h3, []).append(kind)
    assert by_class["Atelectasis"] == ["best", "worst"]  # IoU 1/4 on "a", 1/16 on "b"; nothing missed
    # Cardiomegaly's box on "a" is missed by both folds' models: fold 0's is the "best" (IoU 0), fold 1's missed.
    assert by_class["Cardiomegaly"] == ["best", "missed"]
    assert "IoU 0.06" in text and "IoU 0.25" in text


def test_accuracy_curve_roc_and_reliability_by_hand() -> None:
    # Class 1: IoU 0.2, 0.6 -> at T = 0.1, 0.5, 0.7: 1, 1/2, 0. Class 2: one box of 0.55 -> 1, 1, 0. Empty: left out.
    assert accuracy_curve([[0.2, 0.6], [0.55], []], ts=(0.1, 0.5, 0.7)) == pytest.approx([1.0, 0.75, 0.0])
    # Scores 3 (+), 2 (-), 2 (+), 1 (-): the tie at 2 moves both rates at once.
    pts = roc_points(np.array([3.0, 2.0, 2.0, 1.0]), np.array([1, 0, 1, 0]))
    assert pts == [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]
    assert roc_points(np.array([1.0, 2.0]), np.array([1, 1])) == []  # no negative: no curve
    bins = reliability_bins(np.array([0.05, 0.15, 0.12, 0.95, 1.0]), np.array([0, 1, 0, 1, 1]))
    assert bins == [(0.05, 0.0, 1), (pytest.approx(0.135), 0.5, 2), (pytest.approx(0.975), 1.0, 2)]


def test_gallery_picks_best_worst_and_missed() -> None:
    rows = [
        {"fold": 0, "image_id": "a", "class": "Mass", "iou": 0.7, "ior": 0.8, "present": True, "probability": 0.9,
         "score": 5.0},
        {"fold": 0, "image_id": "b", "class": "Mass", "iou": 0.1, "ior": 0.2, "present": True, "probability": 0.6,
         "score": 3.0},
        {"fold": 1, "image_id": "c", "class": "Mass", "iou": 0.0, "ior": 0.0, "present": False, "probability": 0.2,
         "score": 1.0},
        {"fold": 1, "image_id": "d", "class": "Mass", "iou": 0.3, "ior": 0.3, "present": False, "probability": 0.1,
         "score": 0.5},
        {"fold": 1, "image_id": "e", "class": "Mass", "iou": 0.0, "ior": 0.0, "present": False, "probability": 0.3,
         "score": 1.5},
    ]
    picks = gallery_picks(rows, ["Mass", "Nodule"])
    assert [(k, r["image_id"]) for k, r in picks["Mass"]] == [("best", "a"), ("worst", "b"), ("missed", "d"),
                                                               ("missed", "c")]
    assert "Nodule" not in picks  # no box of it
