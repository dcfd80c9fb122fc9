"""Text labels placed on an overlay so that no two overlap (:class:`LabelPlacer`)."""

from __future__ import annotations

import numpy as np

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

