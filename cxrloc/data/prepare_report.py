"""The report of what ``prepare`` dropped or changed (:data:`PROBLEM_KINDS`, ``Problem``, the
``--strict`` error, the table shown at the end) and the closing lines about a prepared folder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from cxrloc.data.boxes import BoxList
from cxrloc.utils import CxrlocError, read_json

# --------------------------------------------------------------------------- what prepare dropped or changed
PROBLEM_KINDS: dict[str, str] = {
    "annotated_missing": "annotated image not found (dropped)",
    "annotated_unreadable": "annotated image unreadable (dropped)",
    "unreadable": "unannotated image unreadable (dropped)",
    "no_box_left": "every box row skipped (kept unannotated)",
    "not_in_data_entry": "box: image not in the image list (skipped)",
    "unknown_label": "box: unknown label (skipped)",
    "no_area": "box: no area, negative size (skipped)",
    "non_numeric": "box: non-numeric coordinate (skipped)",
    "extra_columns": "box: extra columns (skipped)",
    "malformed": "box: missing fields (skipped)",
    "outside": "box: outside the image (skipped)",
    "duplicate": "box: exact duplicate row (dropped)",
    "clipped": "box: past the image edge (clipped)",
}
"""Every kind of input that ``prepare`` drops or changes, in the order of its report table, for every
format (the image list is NIH's Data_Entry, a labels table or COCO's ``images``; a "line" of a COCO
file is an annotation's position in its list). Images listed without a file and without boxes
are not here: a partial download is normal (they are counted as ``missing``)."""


@dataclass
class Problem:
    """One input ``prepare`` dropped or changed: its kind (a key of :data:`PROBLEM_KINDS`), the
    image, the box list's line when it comes from a row (else 0) and one line of detail."""

    kind: str
    image: str
    line: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "image": self.image, "line": self.line, "detail": self.detail}


class StrictError(CxrlocError):
    """``prepare --strict`` met inputs it would drop or change; nothing was written."""

    def __init__(self, message: str, problems: list[Problem]) -> None:
        super().__init__(message)
        self.problems = problems


def table_problems(
    box_list: BoxList,
    box_path: Path,
    entry_name: str,
    listed: set[str],
    found: dict[str, Path],
) -> list[Problem]:
    """What the tables lose before any image is decoded: the box list's skipped, duplicate and
    clipped rows, box rows of images not in Data_Entry, annotated images not on disk, and images
    left without any box because all their rows were skipped."""
    problems = [Problem(p.kind, p.image, p.line, p.detail) for p in box_list.problems]
    for image_id, lines in box_list.lines.items():
        if image_id not in listed:
            problems += [
                Problem("not_in_data_entry", image_id, line, f"{box_path.name} line {line}: {image_id} is not listed "
                        f"in {entry_name}")
                for line in lines
            ]
        elif image_id not in found:
            problems.append(Problem("annotated_missing", image_id, 0, f"{image_id}: {len(lines)} box(es) in "
                                    f"{box_path.name} (line {lines[0]}), no image file found"))
    skipped_rows = {p.image for p in box_list.problems if p.kind not in ("clipped", "duplicate") and p.image}
    for image_id in sorted(skipped_rows - set(box_list.boxes)):
        if image_id in listed and image_id in found:
            lines = [p.line for p in box_list.problems if p.image == image_id]
            problems.append(Problem("no_box_left", image_id, 0, f"{image_id}: every box row was skipped "
                                    f"(lines {', '.join(map(str, lines))}); it is kept without boxes"))
    return problems


def decode_problems(failed: dict[str, str], annotated: set[str]) -> list[Problem]:
    """Images that could not be decoded, annotated ones apart."""
    return [
        Problem("annotated_unreadable" if i in annotated else "unreadable", i, 0, reason)
        for i, reason in sorted(failed.items())
    ]


def strict_error(problems: list[Problem], written: str) -> StrictError:
    first = problems[0]
    return StrictError(
        f"--strict: {len(problems)} input problem(s) that prepare would drop or change (first: {first.detail}); "
        f"{written}. Fix the inputs, or run without --strict to prepare anyway (the full list then goes to "
        "fingerprint.json)",
        problems,
    )


def problems_table(problems: Sequence[Problem | dict[str, Any]]) -> Table | None:
    """A short table of what ``prepare`` dropped or changed and why (``None`` when nothing was).

    One row per kind of :data:`PROBLEM_KINDS`: the count, the first image (``+N`` more) and the
    first box-list lines; the full list is in ``fingerprint.json`` under ``problems``.
    """
    rows = [p if isinstance(p, Problem) else Problem(**p) for p in problems]
    if not rows:
        return None
    table = Table(title="What prepare dropped or changed (all of it: fingerprint.json, 'problems')",
                  box=box.SIMPLE_HEAD, title_justify="left", padding=(0, 1), collapse_padding=True)
    table.add_column("input (what was done)", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("first image", no_wrap=True)
    table.add_column("lines", no_wrap=True)
    for kind, label in PROBLEM_KINDS.items():
        of_kind = [p for p in rows if p.kind == kind]
        if not of_kind:
            continue
        first = of_kind[0].image or "?"
        if len(of_kind) > 1:
            first += f" +{len(of_kind) - 1}"
        lines = [str(p.line) for p in of_kind if p.line]
        shown = ", ".join(lines[:3]) + (", ..." if len(lines) > 3 else "")
        table.add_row(label, str(len(of_kind)), first, shown)
    return table



def _per_class(counts: Mapping[str, int], limit: int = 20) -> str:
    items = [f"{c} {n}" for c, n in counts.items()]
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def summary_line(out: Path) -> str:
    """One line describing a prepared folder (for the CLI's closing message): the images, and the
    classes with the number of boxes each has in this data (not the classes that may carry boxes)."""
    fp = read_json(out / "fingerprint.json", "fingerprint")
    c = fp["counts"]
    classes = fp.get("classes") or {}
    names = classes.get("names", [])
    boxes = {k: int(v) for k, v in (classes.get("boxes") or {}).items() if int(v) > 0}
    if not boxes and classes.get("boxed"):  # a folder prepared before the counts were recorded
        boxes = {k: 0 for k in classes["boxed"]}
    without = [n for n in names if n not in boxes]
    text = (
        f"{c['cached']} images cached ({c['annotated']} annotated, {c['unannotated_pool']} unannotated in the pool), "
        f"{c['missing']} missing, {c['skipped']} skipped"
        + (f"; {sum(c['problems'].values())} input(s) dropped or changed" if c.get("problems") else "")
    )
    if names:
        text += f"; {len(names)} classes ({len(boxes)} with boxes): boxes per class {_per_class(boxes) or 'none'}"
        if without:
            text += f"; no box: {', '.join(without[:20])}{', ...' if len(without) > 20 else ''}"
    return text


def labels_line(out: Path) -> str | None:
    """The labels that boxes added (per class), or that the table lacks for a box when
    ``--no-labels-from-boxes`` kept the table's labels; ``None`` when the table labels every box."""
    fp = read_json(out / "fingerprint.json", "fingerprint")
    c = fp.get("counts", {})
    added = c.get("labels_added_from_boxes_per_class") or {}
    missing = c.get("labels_missing_for_boxes") or {}
    if added:
        return (f"Labels added from boxes (the table lacked them): {sum(added.values())} image labels, "
                f"{_per_class(added)}; they count in AUROC and labels per image; --no-labels-from-boxes keeps "
                "the table's labels")
    if missing:
        return (f"Boxes without the table's label, kept unlabelled (--no-labels-from-boxes): "
                f"{sum(missing.values())} image labels, {_per_class(missing)}")
    return None
