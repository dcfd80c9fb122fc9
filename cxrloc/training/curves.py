"""``curves.png``: a fold's training curves, drawn with Pillow (a core dependency) after every epoch.

Two panels over the epochs: the training losses (the total and each loss term of ``metrics.csv``)
and the validation accuracy (IoU and IoR at the config's ``eval_threshold``). A later stage
(``crf`` / ``joint``, trained ``--from`` an earlier run) is drawn after the stages it started from
(followed through each ``run.json``'s ``init_from``), with a dashed line and the stage's name at
every boundary, so the whole recipe reads on one picture. Drawing costs a few milliseconds, so it
is redone each epoch (the file is replaced atomically).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from cxrloc.utils import atomic_path

CURVES_NAME: str = "curves.png"
"""The file name in the fold folder."""

SIZE: tuple[int, int] = (900, 640)
"""Width and height of the picture in pixels."""

SERIES_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),  # the first series (total loss / IoU): black
    (230, 159, 0),  # Okabe-Ito orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (213, 94, 0),  # vermillion
    (0, 114, 178),  # blue
    (204, 121, 167),  # reddish purple
)
"""Line colours, from the colour-blind-safe Okabe-Ito palette."""

MAX_CHAIN: int = 8
"""How many earlier stages are followed through ``init_from`` (a guard against a loop)."""

_NOT_LOSS: frozenset[str] = frozenset({"epoch", "stage", "lr", "val_iou_acc", "val_ior_acc", "best", "time_s"})


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def earlier_history(run_json: dict[str, Any]) -> list[dict[str, Any]]:
    """The epochs of the stages a fold started from, oldest first (empty for a first stage).

    Follows ``run.json``'s ``init_from`` (a checkpoint in ``fold_K/checkpoints/``) to that fold's
    ``metrics.csv``, and so on; a missing or unreadable file ends the chain.
    """
    chain: list[list[dict[str, Any]]] = []
    init = run_json.get("init_from")
    for _ in range(MAX_CHAIN):
        if not init:
            break
        fold = Path(init).parent.parent
        try:
            with open(fold / "metrics.csv", newline="") as fh:
                rows = list(csv.DictReader(fh))
            import json

            init = json.loads((fold / "run.json").read_text()).get("init_from")
        except (OSError, ValueError):
            break
        chain.append(rows)
    return [row for rows in reversed(chain) for row in rows]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _nice_range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def draw_curves(history: Sequence[dict[str, Any]], *, title: str = "") -> Image.Image:
    """The picture of ``history`` (``metrics.csv`` rows, in training order, of one or more stages).

    The x axis is the row's position (1, 2, ...): stages that each count their epochs from 1 follow
    one another. Returns an RGB image of :data:`SIZE`; its ``info["Description"]`` says what is drawn.
    """
    width, height = SIZE
    img = Image.new("RGB", SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)
    rows = list(history)
    n = len(rows)
    losses = [k for k in (rows[0] if rows else {}) if k not in _NOT_LOSS]
    losses = ["loss"] + [k for k in losses if k != "loss"] if "loss" in losses else losses
    left, right = 70, width - 170
    panels = (("training loss", losses, 56, height // 2 - 20), ("validation accuracy",
              ["val_iou_acc", "val_ior_acc"], height // 2 + 30, height - 50))
    draw.text((left, 8), title or "training curves", fill=(0, 0, 0), font=font)

    def x_of(i: int) -> float:
        return left + (right - left) * (i / max(n - 1, 1))

    for name, keys, top, bottom in panels:
        series = {k: [_float(r.get(k)) for r in rows] for k in keys}
        lo, hi = (0.0, 1.0) if name.startswith("validation") else _nice_range([v for s in series.values() for v in s])
        draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = bottom - frac * (bottom - top)
            value = lo + frac * (hi - lo)
            draw.line((left - 4, y, left, y), fill=(120, 120, 120))
            draw.text((4, y - 7), f"{value:.3g}", fill=(60, 60, 60), font=small)
        draw.text((left, top - 18), name, fill=(0, 0, 0), font=font)

        def y_of(v: float, top: int = top, bottom: int = bottom, lo: float = lo, hi: float = hi) -> float:
            return bottom - (min(max(v, lo), hi) - lo) / (hi - lo) * (bottom - top)

        for j, (key, values) in enumerate(series.items()):
            color = SERIES_COLORS[j % len(SERIES_COLORS)]
            points = [(x_of(i), y_of(v)) for i, v in enumerate(values) if math.isfinite(v)]
            if len(points) > 1:
                draw.line(points, fill=color, width=3 if j == 0 else 2)
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
            label = {"val_iou_acc": "IoU acc", "val_ior_acc": "IoR acc"}.get(key, key)
            ly = top + 4 + 18 * j
            draw.line((right + 10, ly + 7, right + 34, ly + 7), fill=color, width=3)
            draw.text((right + 40, ly), label, fill=(0, 0, 0), font=small)
        # Stage boundaries: a dashed vertical line where the stage changes, its name beside.
        for i in range(n):
            stage = str(rows[i].get("stage", ""))
            if i == 0 or stage != str(rows[i - 1].get("stage", "")):
                x = x_of(i) - (0 if i == 0 else (x_of(1) - x_of(0)) / 2)
                if i > 0:
                    for y in range(top, bottom, 8):
                        draw.line((x, y, x, min(y + 4, bottom)), fill=(90, 90, 90))
                draw.text((x + 3, bottom - 16), stage, fill=(90, 90, 90), font=small)
    # x axis: epochs (every tick at most ~12 labels).
    step = max(1, math.ceil(n / 12))
    for i in range(0, n, step):
        draw.text((x_of(i) - 4, height - 44), str(rows[i].get("epoch", i + 1)), fill=(60, 60, 60), font=small)
    draw.text(((left + right) // 2 - 20, height - 24), "epoch", fill=(0, 0, 0), font=font)
    stages = []
    for r in rows:
        s = str(r.get("stage", ""))
        if not stages or stages[-1] != s:
            stages.append(s)
    img.info["Description"] = (f"cxrloc training curves; {n} epoch(s); stages {' -> '.join(stages) or 'none'}; "
                               f"series {', '.join(losses + ['val_iou_acc', 'val_ior_acc'])}")
    return img


def write_curves(path: str | Path, history: Sequence[dict[str, Any]], *, title: str = "") -> Path:
    """Draw ``history`` and replace ``path`` with it atomically (a PNG with its description as text)."""
    from PIL import PngImagePlugin

    img = draw_curves(history, title=title)
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", img.info["Description"])
    with atomic_path(path, "training curves") as tmp:
        # Rewritten after every epoch: compress_level=1 encodes in a third of the default time (~35 % larger).
        img.save(tmp, format="PNG", pnginfo=info, compress_level=1)
    return Path(path)
