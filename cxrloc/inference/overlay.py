"""Overlay pictures in the style of the paper's Figure 1, drawn with Pillow only.

The X-ray in grey at its original size; one translucent coloured blob per present class (the
P x P mask of patches with ``z >= 0.5``, bilinearly upsampled so its edges are soft); a legend
with class names, colours and image-level scores; and, when a box list is given, the
ground-truth boxes of the image as labelled rectangles in the colour of their class.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrloc.classes import CLASSES
from cxrloc.evaluation.metrics import REGION_THRESHOLD
from cxrloc.utils import atomic_path

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200),
)
"""One colour per class, in ``CLASSES`` order (Sasha Trubetskoy's distinct colours)."""

BLOB_ALPHA: float = 0.45
"""Opacity of a blob's interior: the anatomy under it stays readable."""

MAX_OVERLAY_PIXELS: int = 4096 * 2048
"""Largest overlay drawn (width x height): the enlargement of small images to ``min_side`` and the
original size of large ones both stop here, so that the picture's memory stays bounded (~100 MB
per float RGB plane) whatever the input's shape."""

OVERLAY_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
"""Overlay file extensions (lower case) and the format written for each."""

GtBox = tuple[str, float, float, float, float]
"""``(class name, x0, y0, x1, y1)`` with coordinates as fractions of the image side."""


def gt_boxes_by_image(path: str | os.PathLike[str]) -> dict[str, list[GtBox]]:
    """Ground-truth boxes per image file name from NIH's ``BBox_List_2017.csv``, for drawing.

    Read by :func:`cxrloc.data.nih.read_bbox_list` (its quirks, label spellings, 1024-pixel frame
    and clipping), with each class index turned into its name. Rows that cannot be used are left
    out with one note naming the first of them.
    """
    from cxrloc.data.nih import read_bbox_list
    from cxrloc.utils import console

    parsed = read_bbox_list(path)
    if parsed.skipped:
        console.print(f"[yellow]Note:[/] {len(parsed.skipped)} row(s) of {path} not drawn; first: {parsed.skipped[0]}")
    boxes = parsed.boxes
    return {name: [(CLASSES[k], x0, y0, x1, y1) for k, x0, y0, x1, y1 in rows] for name, rows in boxes.items()}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def class_color(k: int) -> tuple[int, int, int]:
    """The overlay colour of class index ``k``."""
    return PALETTE[k % len(PALETTE)]


def blob_alpha(zk: np.ndarray, width: int, height: int, threshold: float = REGION_THRESHOLD) -> np.ndarray:
    """Opacity (H, W) in [0, BLOB_ALPHA] of one class's blob: the positive-patch mask, upsampled bilinearly."""
    mask = Image.fromarray(((zk >= threshold) * 255).astype(np.uint8), mode="L")
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
    gt_boxes: list[GtBox] | None = None,
    threshold: float = REGION_THRESHOLD,
    min_side: int = 512,
) -> Image.Image:
    """Draw the prediction of one image.

    Args:
        img: the original image (H, W) in [0, 1] (``read_image``).
        z: the network output (K, P, P).
        present: indices of the classes decided present; each gets a blob.
        classes: class names in output order.
        scores: image-level scores for the legend (default ``z[k].sum()``).
        gt_boxes: ground-truth boxes of this image (normalised), drawn as rectangles.
        threshold: patch threshold of the detected region.
        min_side: a smaller image is enlarged (bilinear) until its shorter side has this many
            pixels, so that the legend and labels stay readable on small inputs.

    Returns:
        An RGB image of the original size, or enlarged to ``min_side``; in both cases at most
        :data:`MAX_OVERLAY_PIXELS` pixels (scaled down, keeping the aspect ratio, beyond that).
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
    entries = [(k, f"{classes[k]}  {(scores[k] if scores else float(z[k].sum())):.1f}") for k in present]
    if not entries:
        entries = [(-1, "no finding above threshold")]
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
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save ``image`` as PNG atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def overlay_format(path: str | os.PathLike[str]) -> str:
    """The image format an overlay named ``path`` is written in (by its extension).

    Raises:
        CxrlocError: the extension is not ``.png``, ``.jpg`` or ``.jpeg``.
    """
    from cxrloc.utils import CxrlocError

    fmt = OVERLAY_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise CxrlocError(
            f"--overlay {path}: name it .png or .jpg / .jpeg (the format is chosen by the extension)"
        )
    return fmt


def save_overlay(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save ``image`` atomically as PNG or JPEG (quality 95), as the extension of ``path`` says."""
    fmt = overlay_format(path)
    with atomic_path(path, "overlay") as tmp:
        image.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return Path(path)
