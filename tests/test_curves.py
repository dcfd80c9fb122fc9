"""`train`'s curves.png: what is drawn where, the chain of earlier stages, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cxrloc.training.curves import SERIES_COLORS, SIZE, draw_curves, earlier_history, write_curves


def _rows(stage: str, n: int, start_loss: float) -> list[dict[str, object]]:
    return [{"epoch": e + 1, "stage": stage, "loss_t": start_loss / (e + 1), "loss": start_loss / (e + 1) + 0.1,
             "lr": 1e-3, "val_iou_acc": 0.1 * e, "val_ior_acc": 0.2 + 0.1 * e, "best": 0, "time_s": 1.0}
            for e in range(n)]


def test_every_series_is_drawn_in_its_colour_and_stage_boundaries_are_marked(tmp_path: Path) -> None:
    rows = _rows("unary", 4, 2.0) + _rows("crf", 3, 1.0)
    img = draw_curves(rows, title="fold_0")
    assert img.size == SIZE
    a = np.asarray(img)
    for color in SERIES_COLORS[:2]:  # loss and loss_t in the loss panel; IoU / IoR in the accuracy panel
        assert (np.abs(a.astype(int) - np.array(color)).sum(axis=-1) == 0).sum() > 50, color
    assert "7 epoch(s); stages unary -> crf" in img.info["Description"]
    # The dashed boundary sits half-way between epoch 4 (index 3) and the crf's first (index 4).
    left, right = 70, SIZE[0] - 170
    x = round(left + (right - left) * 3.5 / 6)
    column = a[60:300, x - 1:x + 2]
    grey = (np.abs(column.astype(int) - 90).sum(axis=-1) < 10).any(axis=1)
    assert 0.3 < grey.mean() < 0.8  # dashed: about half of the rows
    out = write_curves(tmp_path / "curves.png", rows)
    with Image.open(out) as im:
        assert im.info["Description"].startswith("cxrloc training curves")
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary left


def test_earlier_history_follows_init_from_through_the_stages(tmp_path: Path) -> None:
    def fold(name: str, rows: list[dict[str, object]], init: Path | None) -> Path:
        d = tmp_path / name / "fold_0"
        (d / "checkpoints").mkdir(parents=True)
        header = list(rows[0])
        (d / "metrics.csv").write_text(",".join(header) + "\n" + "".join(
            ",".join(str(r[h]) for h in header) + "\n" for r in rows))
        (d / "run.json").write_text(json.dumps({"init_from": str(init) if init else None}))
        return d / "checkpoints" / "best.pt"

    u = fold("unary", _rows("unary", 2, 2.0), None)
    c = fold("crf", _rows("crf", 3, 1.0), u)
    got = earlier_history({"init_from": str(c)})
    assert [r["stage"] for r in got] == ["unary"] * 2 + ["crf"] * 3
    assert earlier_history({"init_from": None}) == []
    assert earlier_history({"init_from": str(tmp_path / "gone" / "checkpoints" / "best.pt")}) == []
