"""The legend of an overlay: its lines ("Present" / "Not present", :func:`legend_lines`) and the panel
drawn beside the X-ray (:func:`add_legend_panel`), never over the anatomy."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

NOT_PRESENT_SHOWN: int = 5
"""Most "not present" classes listed in the legend (the most probable); the rest are counted."""


def percent(p: float) -> str:
    """A probability as a legend percentage: ``"83%"``, ``"<1%"``, ``">99%"`` (never a false 0 or 100)."""
    v = 100.0 * float(p)
    if v < 0.5:
        return "<1%"
    if v >= 99.5:
        return ">99%"
    return f"{v:.0f}%"


def legend_lines(
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


LegendLine = tuple[str, tuple[int, int, int] | None, str]
"""``(kind, colour or None, text)``: kind is ``head``, ``item`` or ``note``."""


def describe_overlay(image: Image.Image, lines: Sequence[LegendLine], width: int, drawn: str) -> Image.Image:
    """Store the legend's text, the X-ray's width and the classes drawn in ``image.info`` (written into a
    PNG as text chunks by :func:`cxrloc.inference.overlay.save_overlay`); returns ``image``."""
    image.info["Description"] = "cxrloc overlay; " + "; ".join(text for _, _, text in lines)
    image.info["Image-Width"] = str(width)
    image.info["Drawn"] = drawn
    return image


def add_legend_panel(
    picture: Image.Image, lines: Sequence[LegendLine], font: ImageFont.ImageFont | ImageFont.FreeTypeFont, side: int
) -> Image.Image:
    """``picture`` (the X-ray with its regions) with the legend panel on its right: a heading per section
    with a rule under it, a colour swatch before each item drawn on the picture, notes in grey."""
    width, height = picture.size
    draw = ImageDraw.Draw(picture, "RGBA")
    pad = max(4, side // 100)
    sample = draw.textbbox((0, 0), "Ag", font=font)
    line_h = (sample[3] - sample[1]) + pad
    swatch = line_h - pad
    text_w = max(draw.textbbox((0, 0), t, font=font)[2] for _, _, t in lines)
    panel_w = pad * 4 + swatch + text_w
    panel_h = pad * 2 + line_h * len(lines)
    canvas = Image.new("RGB", (width + panel_w, max(height, panel_h)), (24, 24, 24))
    canvas.paste(picture, (0, 0))
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
    return canvas
