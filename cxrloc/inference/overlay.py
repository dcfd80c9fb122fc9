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
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrloc.classes import CLASSES
from cxrloc.data.boxes import PixelBox
from cxrloc.data.formats import read_box_file
from cxrloc.decision import REGION_THRESHOLD, detected_regions
from cxrloc.utils import CxrlocError, atomic_path, console

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

NOT_PRESENT_SHOWN: int = 5
"""Most "not present" classes listed in the legend (the most probable); the rest are counted."""

MAX_OVERLAY_PIXELS: int = 4096 * 2048
"""Largest overlay drawn (width x height): the enlargement of small images to ``min_side`` and the
original size of large ones both stop here, so that the picture's memory stays bounded (~100 MB
per float RGB plane) whatever the input's shape."""

OVERLAY_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
"""Overlay file extensions (lower case) and the format written for each."""

GtBox = tuple[str, float, float, float, float]
"""``(class name, x0, y0, x1, y1)`` with coordinates as fractions of the image side."""


class GtBoxes(dict[str, list[GtBox]]):
    """Ground-truth boxes per image name (a path below the data folder, or a file name), normalised.

    ``pixels`` holds the boxes whose frame is the image file itself (a plain boxes table, a COCO
    entry without width and height): ``(class name, x, y, w, h)`` in pixels, normalised by
    :func:`gt_boxes_of` once the image's size is known.
    """

    def __init__(self, boxes: dict[str, list[GtBox]] | None = None,
                 pixels: dict[str, list[PixelBox]] | None = None) -> None:
        super().__init__(boxes or {})
        self.pixels = dict(pixels or {})


def gt_boxes_by_image(path: str | os.PathLike[str]) -> GtBoxes:
    """Ground-truth boxes per image, for drawing; find an image's with :func:`gt_boxes_of`.

    Three kinds of file: NIH's ``BBox_List_2017.csv`` (its header starts with ``Image Index``), read
    by :func:`cxrloc.data.nih.read_bbox_list` (its quirks, label spellings, 1024-pixel frame and
    clipping); a COCO annotation file (``.json``), read by :mod:`cxrloc.data.coco` (its categories'
    names, each image's width and height as the frame, else the file's own size; images named by
    their ``file_name``, a path below the data folder); a plain boxes table with the columns
    ``image, label, x, y, w, h`` (``prepare --format table``'s default names), in pixels of each
    image file. The readers are those of ``prepare`` (:func:`cxrloc.data.formats.read_box_file`).
    Rows that cannot be used are left out with one note naming the first of them.

    Raises:
        CxrlocError: the file cannot be read, or is none of the three.
    """
    found = read_box_file(path)
    classes, parsed, pixels = found.classes, found.parsed, found.pixels
    if parsed.skipped:
        console.print(f"[yellow]Note:[/] {len(parsed.skipped)} row(s) of {path} not drawn; first: {parsed.skipped[0]}")
    out: dict[str, list[GtBox]] = {}
    for name, boxes in parsed.boxes.items():
        out.setdefault(name, []).extend((classes[k], x0, y0, x1, y1) for k, x0, y0, x1, y1 in boxes)
    return GtBoxes(out, pixels)


def gt_boxes_of(
    gt_boxes: dict[str, list[GtBox]], path: str | os.PathLike[str], size: tuple[int, int] | None = None
) -> list[GtBox]:
    """The ground-truth boxes of the image file ``path`` in :func:`gt_boxes_by_image`'s table.

    A box list names an image by its path below the data folder (COCO's ``file_name`` or a boxes
    table's ``image``, e.g. ``pat01/scan0.dcm``) or by its file name (NIH). The longest trailing
    part of ``path`` that the list names wins, so ``/data/pat01/scan0.dcm`` gets the boxes of
    ``pat01/scan0.dcm``, never those of ``pat02/scan0.dcm``; a bare file name is used only when one
    entry of the list ends in it. Boxes in the file's own pixels are divided by ``size`` (width,
    height of the image read) and clipped to it; without ``size`` they are left out.
    """
    pixels = getattr(gt_boxes, "pixels", {})
    names = set(gt_boxes) | set(pixels)
    parts = Path(path).parts
    key = None
    for n in range(len(parts), 0, -1):
        if "/".join(parts[-n:]) in names:
            key = "/".join(parts[-n:])
            break
    if key is None:
        matches = [k for k in names if parts and k.rpartition("/")[2] == parts[-1]]
        if len(matches) != 1:
            return []
        key = matches[0]
    out = list(gt_boxes.get(key, []))
    if size is not None:
        width, height = float(size[0]), float(size[1])
        for name, x, y, w, h in pixels.get(key, []):
            x0, y0 = max(x / width, 0.0), max(y / height, 0.0)
            x1, y1 = min((x + w) / width, 1.0), min((y + h) / height, 1.0)
            if x1 > x0 and y1 > y0:
                out.append((name, x0, y0, x1, y1))
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def percent(p: float) -> str:
    """A probability as a legend percentage: ``"83%"``, ``"<1%"``, ``">99%"`` (never a false 0 or 100)."""
    v = 100.0 * float(p)
    if v < 0.5:
        return "<1%"
    if v >= 99.5:
        return ">99%"
    return f"{v:.0f}%"


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


Rect = tuple[float, float, float, float]


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class LabelPlacer:
    """Places text labels inside a ``width x height`` picture so that no two overlap.

    Each label gets the first of its candidate positions (above, below, inside its anchor box...)
    that lies in the picture and overlaps no label placed before; when none is free, the first
    candidate is replaced by the free spot nearest the anchor (only a picture too full of labels
    leaves none, and then the first candidate is taken).
    """

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.placed: list[Rect] = []

    def _fits(self, r: Rect) -> bool:
        inside = r[0] >= 0 and r[1] >= 0 and r[2] <= self.width and r[3] <= self.height
        return inside and not any(_overlaps(r, p) for p in self.placed)

    def _clamp(self, x: float, y: float, w: float, h: float) -> Rect:
        x = min(max(x, 0.0), max(self.width - w, 0.0))
        y = min(max(y, 0.0), max(self.height - h, 0.0))
        return (x, y, x + w, y + h)

    def place(self, anchor: Rect, w: float, h: float, gap: float = 2.0) -> Rect:
        """A free ``w x h`` rectangle next to ``anchor`` (x0, y0, x1, y1); it is then taken."""
        x0, y0, x1, y1 = anchor
        candidates = [
            (x0, y0 - h - gap), (x0, y1 + gap), (x0 + gap, y0 + gap), (x1 - w, y0 - h - gap),
            (x1 - w, y1 + gap), (x1 + gap, y0), (x0 - w - gap, y0),
        ]
        rects = [self._clamp(x, y, w, h) for x, y in candidates]
        choice = next((r for r in rects if self._fits(r)), None)
        if choice is None:  # the free spot nearest the anchor, on a grid of half-label steps
            best = None
            for y in np.arange(0.0, max(self.height - h, 0.0) + 1e-9, max(h / 2, 1.0)):
                for x in np.arange(0.0, max(self.width - w, 0.0) + 1e-9, max(w / 2, 1.0)):
                    r = (float(x), float(y), float(x) + w, float(y) + h)
                    d = (x - x0) ** 2 + (y - y0) ** 2
                    if (best is None or d < best[0]) and self._fits(r):
                        best = (d, r)
            choice = best[1] if best is not None else None
        choice = choice or rects[0]
        self.placed.append(choice)
        return choice


def _legend_lines(
    classes: Sequence[str], shown: Sequence[int], called: Sequence[int], colors: dict[int, tuple[int, int, int]],
    values: Sequence[float], probabilities: bool, thresholds: Sequence[float | None] | None, empty_message: str,
    has_region: dict[int, bool],
) -> list[tuple[str, tuple[int, int, int] | None, str]]:
    """``(kind, colour or None, text)`` of each legend line; kind is ``head``, ``item`` or ``note``."""
    def value(k: int) -> str:
        return percent(values[k]) if probabilities else f"1'z {values[k]:.1f}"

    lines: list[tuple[str, tuple[int, int, int] | None, str]] = []
    rule = "p >= threshold" if probabilities else "1'z >= tau_hat"
    lines.append(("head", None, f"Present ({rule})"))
    if not called:
        lines.append(("note", None, empty_message))
    for k in called:
        text = f"{classes[k]}  {value(k)}"
        t = thresholds[k] if thresholds is not None else None
        if t is not None:
            text += f"  (>= {percent(t) if probabilities else f'{t:.1f}'})"
        if not has_region.get(k, True):
            text += "  (no region)"
        lines.append(("item", colors.get(k), text))
    rest = sorted((k for k in range(len(classes)) if k not in set(called)), key=lambda k: -values[k])
    if rest:
        lines.append(("head", None, "Not present"))
        listed = [k for k in rest if k in set(shown)] + [k for k in rest if k not in set(shown)]
        listed = listed[: max(NOT_PRESENT_SHOWN, sum(k in set(shown) for k in rest))]
        for k in listed:
            lines.append(("item", colors.get(k) if k in set(shown) else None, f"{classes[k]}  {value(k)}"))
        if len(rest) > len(listed):
            lower = max(values[k] for k in rest if k not in listed)
            more = percent(lower) if probabilities else f"{lower:.1f}"
            lines.append(("note", None, f"+ {len(rest) - len(listed)} more, each <= {more}"))
    return lines


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
    height, width = img.shape
    scale = overlay_scale(height, width, min_side)
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = np.asarray(Image.fromarray(np.asarray(img, dtype=np.float32), mode="F").resize(size, Image.BILINEAR))
        height, width = img.shape
    z = np.asarray(z)
    num = z.shape[0]
    if probabilities is not None:
        values = [float(v) for v in probabilities]
    else:
        values = [float(scores[k]) if scores is not None else float(z[k].sum()) for k in range(num)]
    called = list(present if called is None else called)
    # Colours in order of probability: the most probable drawn class gets the first; then ground truth.
    order = sorted(present, key=lambda k: -values[k])
    colors = {k: color_of(r) for r, k in enumerate(order)}
    for name, *_ in gt_boxes or []:
        k = list(classes).index(name) if name in classes else -1
        if k not in colors:
            colors[k] = color_of(len(colors))
    side = min(width, height)
    line_w = max(2, side // 250)
    gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0) * np.float32(255.0)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    masks = {k: region_mask(z[k], width, height, threshold) for k in order}
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
    canvas_img = Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(canvas_img, "RGBA")
    font = _font(max(11, side // 40))
    placer = LabelPlacer(width, height)

    def label(anchor: Rect, text: str, color: tuple[int, int, int]) -> None:
        box = draw.textbbox((0, 0), text, font=font)
        w, h = box[2] - box[0] + 6, box[3] - box[1] + 6
        x0, y0, x1, y1 = placer.place(anchor, w, h)
        draw.rectangle((x0, y0, x1, y1), fill=(0, 0, 0, 190))
        draw.text((x0 + 3 - box[0], y0 + 3 - box[1]), text, fill=color + (255,), font=font)

    # Ground-truth rectangles first (labels placed in order, so each later one avoids the earlier).
    for name, x0, y0, x1, y1 in gt_boxes or []:
        k = list(classes).index(name) if name in classes else -1
        rect = (x0 * width, y0 * height, x1 * width, y1 * height)
        draw.rectangle(rect, outline=HALO + (255,), width=line_w + 2)
        draw.rectangle(rect, outline=colors[k] + (255,), width=line_w)
    for name, x0, y0, x1, y1 in gt_boxes or []:
        k = list(classes).index(name) if name in classes else -1
        label((x0 * width, y0 * height, x1 * width, y1 * height), f"GT {name}", colors[k])
    # The probability beside each drawn region (its largest component's bounding box), most probable first.
    has_region: dict[int, bool] = {}
    for k in order:
        ys, xs = np.nonzero(masks[k])
        has_region[k] = bool(ys.size)
        if ys.size:
            text = f"{classes[k]} {percent(values[k]) if probabilities is not None else f'{values[k]:.1f}'}"
            label((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)), text, colors[k])

    lines = _legend_lines(classes, order, called, colors, values, probabilities is not None, thresholds,
                          empty_message,
                          {k: has_region.get(k, bool(detected_regions(z[k], threshold).any())) for k in called})
    drawn = ", ".join(classes[k] for k in order)
    if not legend:
        canvas_img.info["Description"] = "cxrloc overlay; " + "; ".join(text for _, _, text in lines)
        canvas_img.info["Image-Width"] = str(width)
        canvas_img.info["Drawn"] = drawn
        return canvas_img
    pad = max(4, side // 100)
    sample = draw.textbbox((0, 0), "Ag", font=font)
    line_h = (sample[3] - sample[1]) + pad
    swatch = line_h - pad
    text_w = max(draw.textbbox((0, 0), t, font=font)[2] for _, _, t in lines)
    panel_w = pad * 4 + swatch + text_w
    panel_h = pad * 2 + line_h * len(lines)
    canvas = Image.new("RGB", (width + panel_w, max(height, panel_h)), (24, 24, 24))
    canvas.paste(canvas_img, (0, 0))
    d = ImageDraw.Draw(canvas)
    for i, (kind, color, text) in enumerate(lines):
        y = pad + i * line_h
        x = width + pad
        if kind == "head":
            d.text((x, y - sample[1]), text, fill=(255, 255, 255), font=font)
            d.line((x, y + swatch + 1, width + panel_w - pad, y + swatch + 1), fill=(140, 140, 140))
            continue
        if color is not None:
            d.rectangle((x + pad, y, x + pad + swatch, y + swatch), outline=color, width=max(2, swatch // 5))
        tint = (170, 170, 170) if kind == "note" else (235, 235, 235)
        d.text((x + pad * 2 + swatch, y - sample[1]), text, fill=tint, font=font)
    canvas.info["Description"] = "cxrloc overlay; " + "; ".join(
        text for kind, _, text in lines)
    canvas.info["Image-Width"] = str(width)
    canvas.info["Drawn"] = drawn
    return canvas


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
