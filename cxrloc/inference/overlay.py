"""Overlay pictures in the style of the paper's Figure 1, drawn with Pillow only, made to read at a glance.

The X-ray in grey at its original size (small images enlarged). Each class shown gets its own
colour from the colour-blind-safe Okabe-Ito palette (:data:`PALETTE`), given in order of
probability (the most probable class first), and is drawn as:

- an **outline** (contour, with a thin dark edge so it reads on bone and on lung) of its detected
  region (the P x P patches with ``z >= 0.5``, upsampled to the image);
- a **light fill** (:data:`FILL_ALPHA`) that never mixes colours: where regions overlap, a pixel
  takes the fill of the most probable class only, and that class's outline is drawn last (on top);
- its **probability next to the region** ("Effusion 83%").

Ground-truth boxes (``--boxes``) are rectangles in the colour of their class (a class not shown
gets the next colour), labelled "GT name"; every label on the picture is placed where it overlaps
no other label (:class:`LabelPlacer`). A legend panel beside the image (never over the anatomy)
has two sections: "Present (p >= threshold)" (each class with its probability and its threshold)
and "Not present" (the most probable of the others). Its text is also stored in the PNG's
``Description`` text chunk, for readers that cannot see the picture.

Ground-truth boxes are read by :mod:`cxrloc.inference.gt_boxes`, labels placed by
:mod:`cxrloc.inference.label_placer` and the legend made by :mod:`cxrloc.inference.overlay_legend`;
their public names are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrloc.classes import CLASSES
from cxrloc.decision import REGION_THRESHOLD, detected_regions
from cxrloc.inference.gt_boxes import GtBox, GtBoxes, gt_boxes_by_image, gt_boxes_of
from cxrloc.inference.label_placer import LabelPlacer, Rect
from cxrloc.inference.overlay_legend import (
    NOT_PRESENT_SHOWN,
    add_legend_panel,
    describe_overlay,
    legend_lines,
    percent,
)
from cxrloc.utils import CxrlocError, atomic_path

__all__ = [
    "FILL_ALPHA", "HALO", "MAX_OVERLAY_PIXELS", "NOT_PRESENT_SHOWN", "NO_FINDING", "OVERLAY_FORMATS", "PALETTE",
    "GtBox", "GtBoxes", "LabelPlacer", "Rect", "color_of", "contour", "gt_boxes_by_image", "gt_boxes_of",
    "overlay_format", "overlay_scale", "percent", "region_mask", "render_overlay", "save_overlay",
]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (240, 228, 66),  # yellow
    (0, 114, 178),  # blue
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # reddish purple
)
"""The Okabe-Ito palette (Okabe and Ito 2008, "Color Universal Design") without its black: seven
colours told apart with every common colour-vision deficiency. The classes of one picture take them
in order of probability; an eighth class and beyond reuse them with a dashed outline."""

FILL_ALPHA: float = 0.22
"""Opacity of a region's fill: light, so the anatomy under it stays readable."""

HALO: tuple[int, int, int] = (0, 0, 0)
"""The thin dark edge around every outline and label."""

NO_FINDING: str = "No finding called present"
"""The legend's line when no class is called present."""

MAX_OVERLAY_PIXELS: int = 4096 * 2048
"""Largest overlay drawn (width x height): the enlargement of small images to ``min_side`` and the
original size of large ones both stop here, so that the picture's memory stays bounded (~100 MB
per float RGB plane) whatever the input's shape."""

OVERLAY_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
"""Overlay file extensions (lower case) and the format written for each."""


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()



def color_of(rank: int) -> tuple[int, int, int]:
    """The colour of the class drawn ``rank``-th (0 = the most probable): :data:`PALETTE`, cycled."""
    return PALETTE[rank % len(PALETTE)]


def region_mask(zk: np.ndarray, width: int, height: int, threshold: float = REGION_THRESHOLD) -> np.ndarray:
    """The detected region ``zk >= threshold`` upsampled to ``height x width`` (bool): bilinear, then
    cut at one half, so the outline follows the patches with slightly rounded corners."""
    mask = Image.fromarray((detected_regions(zk, threshold) * 255).astype(np.uint8), mode="L")
    up = mask.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(up) >= 128


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` grown by ``r`` pixels (a square of side 2r + 1), by shifting."""
    out = mask.copy()
    for _ in range(max(0, r)):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def contour(mask: np.ndarray, width: int) -> np.ndarray:
    """The outline of ``mask``, ``width`` pixels thick, on the inside of its edge (bool, same shape)."""
    inner = mask.copy()
    for _ in range(max(1, width)):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return mask & ~inner


def overlay_scale(height: int, width: int, min_side: int = 512) -> float:
    """The factor applied to an image for its overlay: enlarge to ``min_side``, never past
    :data:`MAX_OVERLAY_PIXELS` (so a 4 x 3000 strip is not blown up to 512 x 384,000)."""
    scale = max(1.0, min_side / max(1, min(height, width)))
    if height * width * scale * scale > MAX_OVERLAY_PIXELS:
        scale = (MAX_OVERLAY_PIXELS / (height * width)) ** 0.5
    return scale


def render_overlay(
    img: np.ndarray,
    z: np.ndarray,
    present: Sequence[int],
    *,
    classes: tuple[str, ...] | list[str] = CLASSES,
    scores: Sequence[float] | None = None,
    probabilities: Sequence[float] | np.ndarray | None = None,
    gt_boxes: list[GtBox] | None = None,
    threshold: float = REGION_THRESHOLD,
    min_side: int = 512,
    empty_message: str = NO_FINDING,
    called: Sequence[int] | None = None,
    thresholds: Sequence[float | None] | None = None,
    legend: bool = True,
) -> Image.Image:
    """Draw the prediction of one image (see the module docstring for what is drawn).

    Args:
        img: the original image (H, W) in [0, 1] (``read_image``).
        z: the network output (K, P, P).
        present: indices of the classes drawn (outline, fill and label).
        classes: class names in output order.
        scores: image-level scores ``1'z`` for the legend when there are no probabilities (default
            ``z[k].sum()``).
        probabilities: calibrated probabilities (K,), shown as percentages.
        gt_boxes: ground-truth boxes of this image (normalised), drawn as labelled rectangles.
        threshold: patch threshold of the detected region.
        min_side: a smaller image is enlarged (bilinear) until its shorter side has this many
            pixels, so that the labels stay readable on small inputs.
        empty_message: the legend's line under "Present" when no class is called present.
        called: the classes called present at the operating point (the legend's "Present"
            section; default ``present``). A class drawn but not called is listed under "Not present".
        thresholds: each class's threshold (a probability, or ``tau_hat`` on ``1'z`` without
            probabilities; ``None`` for a class never called present), shown beside a present class.

    Returns:
        An RGB image: the X-ray (original size, or enlarged to ``min_side``; at most
        :data:`MAX_OVERLAY_PIXELS` pixels) with the legend panel on its right. Its
        ``info["Description"]`` holds the legend's text, ``info["Drawn"]`` the classes drawn (most probable
        first) and ``info["Image-Width"]`` the X-ray's width (all written into a PNG by :func:`save_overlay`).
    """
    img = _enlarged(img, min_side)
    height, width = img.shape
    z = np.asarray(z)
    values = _legend_values(z, scores, probabilities)
    called = list(present if called is None else called)
    order = sorted(present, key=lambda k: -values[k])  # the most probable drawn class first
    colors = class_colors(order, gt_boxes, classes)
    side = min(width, height)
    line_w = max(2, side // 250)
    masks = {k: region_mask(z[k], width, height, threshold) for k in order}
    picture = Image.fromarray(_paint_regions(img, order, masks, colors, line_w), mode="RGB")
    labels = _LabelWriter(picture, _font(max(11, side // 40)))
    labels.ground_truth(gt_boxes or [], classes, colors, line_w)
    value_text = {k: percent(values[k]) if probabilities is not None else f"{values[k]:.1f}" for k in order}
    has_region = labels.regions(order, masks, classes, value_text, colors)
    lines = legend_lines(classes, order, called, colors, values, probabilities is not None, thresholds,
                         empty_message,
                         {k: has_region.get(k, bool(detected_regions(z[k], threshold).any())) for k in called})
    drawn = ", ".join(classes[k] for k in order)
    if legend:
        picture = add_legend_panel(picture, lines, labels.font, side)
    return describe_overlay(picture, lines, width, drawn)


def _enlarged(img: np.ndarray, min_side: int) -> np.ndarray:
    """``img`` scaled by :func:`overlay_scale` (bilinear, float32), or as it is when the factor is 1."""
    height, width = img.shape
    scale = overlay_scale(height, width, min_side)
    if scale == 1.0:
        return img
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(np.asarray(img, dtype=np.float32), mode="F").resize(size, Image.BILINEAR))


def _legend_values(
    z: np.ndarray, scores: Sequence[float] | None, probabilities: Sequence[float] | np.ndarray | None
) -> list[float]:
    """Each class's value in the legend: its probability, else its score ``1'z`` (default ``z[k].sum()``)."""
    if probabilities is not None:
        return [float(v) for v in probabilities]
    return [float(scores[k]) if scores is not None else float(z[k].sum()) for k in range(z.shape[0])]


def class_colors(
    order: Sequence[int], gt_boxes: Sequence[GtBox] | None, classes: Sequence[str]
) -> dict[int, tuple[int, int, int]]:
    """The colour of each class drawn (``order``: most probable first, the first colours), then of each
    ground-truth box's class not drawn (a name not in ``classes`` is class -1)."""
    colors = {k: color_of(r) for r, k in enumerate(order)}
    for name, *_ in gt_boxes or []:
        k = list(classes).index(name) if name in classes else -1
        if k not in colors:
            colors[k] = color_of(len(colors))
    return colors


def _paint_regions(
    img: np.ndarray, order: Sequence[int], masks: dict[int, np.ndarray], colors: dict[int, tuple[int, int, int]],
    line_w: int,
) -> np.ndarray:
    """The grey X-ray (uint8 RGB) with each region's light fill (the most probable class owns an overlap)
    and its haloed outline (the most probable on top; dashed beyond the palette)."""
    height, width = img.shape
    gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0) * np.float32(255.0)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    owner = np.full((height, width), -1, dtype=np.int32)
    for k in reversed(order):  # the least probable first: the most probable owns the overlap
        owner[masks[k]] = k
    for k in order:
        sel = owner == k
        rgb[sel] = rgb[sel] * (1.0 - FILL_ALPHA) + np.asarray(colors[k], np.float32) * FILL_ALPHA
    for r, k in reversed(list(enumerate(order))):  # outlines, the most probable on top
        edge = contour(masks[k], line_w)
        if r >= len(PALETTE):  # beyond the palette: a dashed outline tells the reused colour apart
            yy, xx = np.mgrid[:height, :width]
            edge &= ((xx + yy) // (4 * line_w)) % 2 == 0
        rgb[_dilate(edge, 1) & ~edge] = HALO
        rgb[edge] = colors[k]
    return np.rint(rgb).astype(np.uint8)


class _LabelWriter:
    """Draws the ground-truth rectangles and the text labels on the picture, each label where it
    overlaps no earlier one (:class:`LabelPlacer`)."""

    def __init__(self, picture: Image.Image, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
        self.draw = ImageDraw.Draw(picture, "RGBA")
        self.font = font
        self.width, self.height = picture.size
        self.placer = LabelPlacer(self.width, self.height)

    def label(self, anchor: Rect, text: str, color: tuple[int, int, int]) -> None:
        """``text`` in ``color`` on a dark box placed next to ``anchor``."""
        box = self.draw.textbbox((0, 0), text, font=self.font)
        w, h = box[2] - box[0] + 6, box[3] - box[1] + 6
        x0, y0, x1, y1 = self.placer.place(anchor, w, h)
        self.draw.rectangle((x0, y0, x1, y1), fill=(0, 0, 0, 190))
        self.draw.text((x0 + 3 - box[0], y0 + 3 - box[1]), text, fill=color + (255,), font=self.font)

    def ground_truth(
        self, gt_boxes: Sequence[GtBox], classes: Sequence[str], colors: dict[int, tuple[int, int, int]], line_w: int
    ) -> None:
        """The boxes' haloed rectangles first, then their "GT name" labels (placed in order, so each later
        one avoids the earlier)."""
        width, height = self.width, self.height
        for name, x0, y0, x1, y1 in gt_boxes:
            k = list(classes).index(name) if name in classes else -1
            rect = (x0 * width, y0 * height, x1 * width, y1 * height)
            self.draw.rectangle(rect, outline=HALO + (255,), width=line_w + 2)
            self.draw.rectangle(rect, outline=colors[k] + (255,), width=line_w)
        for name, x0, y0, x1, y1 in gt_boxes:
            k = list(classes).index(name) if name in classes else -1
            self.label((x0 * width, y0 * height, x1 * width, y1 * height), f"GT {name}", colors[k])

    def regions(
        self, order: Sequence[int], masks: dict[int, np.ndarray], classes: Sequence[str], value_text: dict[int, str],
        colors: dict[int, tuple[int, int, int]],
    ) -> dict[int, bool]:
        """"Name value" beside each drawn region (anchored on the region's bounding box), most probable
        first; returns whether each class of ``order`` has a region on the picture."""
        has_region: dict[int, bool] = {}
        for k in order:
            ys, xs = np.nonzero(masks[k])
            has_region[k] = bool(ys.size)
            if ys.size:
                anchor = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                self.label(anchor, f"{classes[k]} {value_text[k]}", colors[k])
        return has_region


def overlay_format(path: str | os.PathLike[str]) -> str:
    """The image format an overlay named ``path`` is written in (by its extension).

    Raises:
        CxrlocError: the extension is not ``.png``, ``.jpg`` or ``.jpeg``.
    """
    fmt = OVERLAY_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise CxrlocError(
            f"--overlay {path}: name it .png or .jpg / .jpeg (the format is chosen by the extension)"
        )
    return fmt


def save_overlay(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save ``image`` atomically as PNG or JPEG (quality 95), as the extension of ``path`` says.

    A PNG keeps the image's text ``info`` (the legend) as text chunks. Both carry the
    :data:`cxrloc.paths.MARKER` (PNG ``Software`` text, JPEG comment) by which a later run knows
    the file as its own output (:func:`cxrloc.paths.made_by_cxrloc`).
    """
    from PIL import PngImagePlugin

    from cxrloc.paths import MARKER

    fmt = overlay_format(path)
    options: dict[str, object] = {"quality": 95, "comment": MARKER} if fmt == "JPEG" else {}
    if fmt == "PNG":
        text = PngImagePlugin.PngInfo()
        for key, value in image.info.items():
            if isinstance(value, str) and key != "Software":
                text.add_text(key, value)
        text.add_text("Software", MARKER)
        options["pnginfo"] = text
    with atomic_path(path, "overlay") as tmp:
        image.save(tmp, format=fmt, **options)
    return Path(path)
