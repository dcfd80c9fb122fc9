"""Overlay pictures in the style of the paper's Figure 1, drawn with Pillow only.

The X-ray in grey at its original size; one translucent coloured blob per class shown (the
P x P mask of patches with ``z >= 0.5``, bilinearly upsampled so its edges are soft); a legend
with class names, colours and probabilities (``1'z`` for an uncalibrated model), or a line saying
that no class is shown; and, when a box list is given, the ground-truth boxes of the image as
labelled rectangles in the colour of their class. The legend's text is also stored in the PNG's
``Description`` text chunk, for readers that cannot see the picture.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrloc.classes import CLASSES
from cxrloc.data.boxes import PixelBox
from cxrloc.data.formats import read_box_file
from cxrloc.decision import REGION_THRESHOLD, detected_regions
from cxrloc.utils import CxrlocError, atomic_path, console

PALETTE: tuple[tuple[int, int, int], ...] = (
    (15, 90, 195),  # Atelectasis: blue
    (255, 90, 0),  # Cardiomegaly: orange-red
    (0, 255, 240),  # Effusion: cyan
    (225, 225, 0),  # Infiltration: yellow
    (195, 0, 105),  # Mass: crimson
    (165, 0, 255),  # Nodule: violet
    (0, 225, 90),  # Pneumonia: green
    (255, 120, 255),  # Pneumothorax: pink
    (30, 120, 45),  # Consolidation: dark green
    (135, 150, 255),  # Edema: periwinkle
    (255, 180, 90),  # Emphysema: light orange
    (150, 120, 0),  # Fibrosis: olive
    (255, 120, 135),  # Pleural_Thickening: salmon
    (180, 45, 30),  # Hernia: brick
)
"""The colours of the first 14 classes (NIH's, in ``CLASSES`` order; the first 14 of any other
class list); :func:`class_color` makes more for longer lists.

Chosen for a grey radiograph: a greedy max-min search over sRGB (steps of 15) of CIEDE2000
distances, between the colours themselves and between their blends at :data:`BLOB_ALPHA` over dark,
mid and light grey, among colours at least 25 (CIEDE2000) from the grey of their own lightness.
Every pair is at least 22 apart as drawn in the legend and 11 apart as a blob (the previous
palette: 14 and 8, with a near-grey cream); classes that are often found together (Cardiomegaly and
Effusion, Pneumonia with Consolidation and Infiltration, Mass and Nodule) got distinct hues.
``tests/test_overlay.py`` recomputes the distances.
"""

BLOB_ALPHA: float = 0.45
"""Opacity of a blob's interior: the anatomy under it stays readable."""

NO_FINDING: str = "No finding called present"
"""The legend's line when no class is shown."""

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


EXTRA_SATURATION: float = 0.9
EXTRA_LIGHTNESS: tuple[float, float] = (0.36, 0.62)
"""Saturation and lightness range of the colours beyond :data:`PALETTE`: saturated, never near
black, white or the grey of a radiograph."""

_R2 = (0.7548776662466927, 0.5698402909980532)
"""The R2 low-discrepancy sequence (Roberts 2018, from the plastic number): successive points spread
evenly over (hue, lightness), so any number of extra colours stay apart and distinct."""


def class_color(k: int) -> tuple[int, int, int]:
    """The overlay colour of class index ``k``: :data:`PALETTE` for the first 14, then saturated
    colours spread over hue and lightness by the R2 sequence (distinct for up to
    :data:`cxrloc.classes.MAX_CLASSES` classes, tested), for a class list of any length."""
    import colorsys

    if k < len(PALETTE):
        return PALETTE[k]
    j = k - len(PALETTE) + 1
    hue = (0.5 + _R2[0] * j) % 1.0
    lo, hi = EXTRA_LIGHTNESS
    light = lo + (hi - lo) * ((0.5 + _R2[1] * j) % 1.0)
    r, g, b = colorsys.hls_to_rgb(hue, light, EXTRA_SATURATION)
    return round(r * 255), round(g * 255), round(b * 255)


def percent(p: float) -> str:
    """A probability as a legend percentage: ``"83%"``, ``"<1%"``, ``">99%"`` (never a false 0 or 100)."""
    v = 100.0 * float(p)
    if v < 0.5:
        return "<1%"
    if v >= 99.5:
        return ">99%"
    return f"{v:.0f}%"


def blob_alpha(zk: np.ndarray, width: int, height: int, threshold: float = REGION_THRESHOLD) -> np.ndarray:
    """Opacity (H, W) in [0, BLOB_ALPHA] of one class's blob: the positive-patch mask, upsampled bilinearly."""
    mask = Image.fromarray((detected_regions(zk, threshold) * 255).astype(np.uint8), mode="L")
    up = mask.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32) * np.float32(BLOB_ALPHA / 255.0)


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
    present: list[int],
    *,
    classes: tuple[str, ...] | list[str] = CLASSES,
    scores: list[float] | None = None,
    probabilities: list[float] | np.ndarray | None = None,
    gt_boxes: list[GtBox] | None = None,
    threshold: float = REGION_THRESHOLD,
    min_side: int = 512,
    empty_message: str = NO_FINDING,
) -> Image.Image:
    """Draw the prediction of one image.

    Args:
        img: the original image (H, W) in [0, 1] (``read_image``).
        z: the network output (K, P, P).
        present: indices of the classes to show; each gets a blob and a legend line.
        classes: class names in output order.
        scores: image-level scores for the legend when there are no probabilities (default
            ``z[k].sum()``, shown as ``1'z``).
        probabilities: calibrated probabilities (K,), shown as percentages in the legend.
        gt_boxes: ground-truth boxes of this image (normalised), drawn as rectangles.
        threshold: patch threshold of the detected region.
        min_side: a smaller image is enlarged (bilinear) until its shorter side has this many
            pixels, so that the legend and labels stay readable on small inputs.
        empty_message: the legend's line when ``present`` is empty.

    Returns:
        An RGB image of the original size, or enlarged to ``min_side``; in both cases at most
        :data:`MAX_OVERLAY_PIXELS` pixels (scaled down, keeping the aspect ratio, beyond that). Its
        ``info["Description"]`` holds the legend's text (written into a PNG by :func:`save_overlay`).
    """
    height, width = img.shape
    scale = overlay_scale(height, width, min_side)
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = np.asarray(Image.fromarray(np.asarray(img, dtype=np.float32), mode="F").resize(size, Image.BILINEAR))
        height, width = img.shape
    rgb = np.repeat(np.clip(img, 0.0, 1.0)[..., None] * np.float32(255.0), 3, axis=2).astype(np.float32)
    for k in present:
        alpha = blob_alpha(z[k], width, height, threshold)[..., None]
        rgb = rgb * (1.0 - alpha) + np.asarray(class_color(k), dtype=np.float32) * alpha
    canvas = Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(canvas, "RGBA")
    side = min(width, height)
    font = _font(max(10, side // 40))
    line_w = max(2, side // 300)

    for name, x0, y0, x1, y1 in gt_boxes or []:
        k = classes.index(name) if name in classes else 0
        rect = (x0 * width, y0 * height, x1 * width, y1 * height)
        draw.rectangle(rect, outline=class_color(k) + (255,), width=line_w)
        label = f"GT {name}"
        tb = draw.textbbox((rect[0], rect[1]), label, font=font)
        ty = max(0.0, rect[1] - (tb[3] - tb[1]) - 2 * line_w)
        tb = draw.textbbox((rect[0], ty), label, font=font)
        draw.rectangle(tb, fill=(0, 0, 0, 160))
        draw.text((rect[0], ty), label, fill=class_color(k) + (255,), font=font)

    # Legend in the top-left corner.
    def label(k: int) -> str:
        if probabilities is not None:
            text = f"{classes[k]}  {percent(probabilities[k])}"
        else:
            text = f"{classes[k]}  1'z {(scores[k] if scores else float(z[k].sum())):.1f}"
        # Called present without a patch at the region threshold: say why no blob is drawn.
        return text if bool(detected_regions(z[k], threshold).any()) else f"{text}  (no region)"

    entries = [(k, label(k)) for k in present]
    if not entries:
        entries = [(-1, empty_message)]
    pad = max(4, side // 100)
    sample = draw.textbbox((0, 0), "Ag", font=font)
    line_h = (sample[3] - sample[1]) + pad
    swatch = line_h - pad
    text_w = max(draw.textbbox((0, 0), t, font=font)[2] for _, t in entries)
    box_w = pad * 3 + swatch + text_w
    box_h = pad + line_h * len(entries)
    draw.rectangle((0, 0, box_w, box_h), fill=(0, 0, 0, 170))
    for i, (k, text) in enumerate(entries):
        y = pad + i * line_h
        if k >= 0:
            draw.rectangle((pad, y, pad + swatch, y + swatch), fill=class_color(k) + (220,))
        draw.text((pad * 2 + swatch, y - sample[1]), text, fill=(255, 255, 255, 255), font=font)
    canvas.info["Description"] = "cxrloc overlay; " + "; ".join(text for _, text in entries)
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
