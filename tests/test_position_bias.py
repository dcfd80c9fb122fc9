"""The optional position bias of the patch head and its start from the training boxes."""

from __future__ import annotations

import numpy as np
import torch

from cxrloc.config import make_config
from cxrloc.geometry import class_box_masks
from cxrloc.model.head import init_position_bias
from cxrloc.model.net import build_model


class _FakePrepared:
    """Just the ``boxes(image_id)`` part of ``Prepared`` that the initialisation reads."""

    def __init__(self, boxes: dict[str, list[tuple[int, float, float, float, float]]]) -> None:
        self._boxes = boxes

    def boxes(self, image_id: str) -> list[tuple[int, float, float, float, float]]:
        return self._boxes[image_id]


def test_position_bias_starts_at_box_coverage_log_odds():
    cfg = make_config("tiny", ["position_bias=true", "crf=false"])
    model = build_model(cfg)
    p = cfg.patch_grid  # 8: patch centres at (i + 0.5) / 8
    prepared = _FakePrepared(
        {
            # Class 1 (Cardiomegaly): left half on image a, top-left quarter on image b.
            "a": [(1, 0.0, 0.0, 0.5, 1.0)],
            "b": [(1, 0.0, 0.0, 0.5, 0.5)],
            "c": [],
        }
    )
    masks = class_box_masks((prepared.boxes(i) for i in ["a", "b", "c"]), p)
    assert init_position_bias(model.unary.head, masks) == 1
    bias = model.unary.head.position_bias.detach().numpy()
    logit = lambda f: np.log(f / (1 - f))  # noqa: E731
    # Top-left quarter: covered by both boxes -> 1.0, clipped to 0.98; bottom-left: 1 of 2;
    # right half: none -> clipped to 0.02.
    assert np.isclose(bias[1, 0, 0], logit(0.98), atol=1e-5)
    assert np.isclose(bias[1, 7, 0], logit(0.5), atol=1e-6)
    assert np.isclose(bias[1, 3, 7], logit(0.02), atol=1e-5)
    assert np.all(bias[0] == 0)  # no boxes of class 0: untouched
    assert float(model.unary.head.conv2.bias[1]) == 0.0

    # With the image-driven part silenced, the region z >= 0.5 is the patches covered by >= half the boxes.
    with torch.no_grad():
        model.unary.head.conv2.weight.zero_()
    model.eval()
    with torch.no_grad():
        z, _ = model(torch.zeros(1, 1, 64, 64))
    region = z[0, 1].numpy() >= 0.5
    expected = np.zeros((p, p), bool)
    expected[:, :4] = True
    assert np.array_equal(region, expected)


def test_position_bias_absent_by_default():
    assert build_model(make_config("tiny")).unary.head.position_bias is None
