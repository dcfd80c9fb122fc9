"""The optional CoordConv input of the patch head (head_coords)."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import torch

from cxrloc.config import make_config
from cxrloc.model.net import build_model


def test_coordinate_channels_are_patch_centres():
    model = build_model(make_config("tiny", ["head_coords=true"]))
    p = model.patch_grid
    grid = model.unary.head.coord_grid[0].numpy()
    # Patch (r, c) has its centre at x = (c + 0.5) / P, y = (r + 0.5) / P in [0, 1] -> [-1, 1].
    for r, c in [(0, 0), (0, p - 1), (3, 5), (p - 1, 2)]:
        assert np.isclose(grid[0, r, c], 2 * (c + 0.5) / p - 1)
        assert np.isclose(grid[1, r, c], 2 * (r + 0.5) / p - 1)
    # The first head conv sees the two extra channels.
    assert model.unary.head.conv1.in_channels == build_model(make_config("tiny")).unary.head.conv1.in_channels + 2


def test_coords_make_the_output_position_dependent_and_export(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_config("tiny", ["head_coords=true", "crf=false"])).eval()
    with torch.no_grad():
        # Weights on the coordinate channels only: a constant image still gives a spatially varying map.
        model.unary.head.conv1.weight.zero_()
        model.unary.head.conv1.weight[:, -2:] = torch.randn_like(model.unary.head.conv1.weight[:, -2:])
        z, _ = model(torch.zeros(1, 1, 64, 64))
    assert float(z.std()) > 1e-4
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 1, 64, 64),), str(path), dynamo=False, opset_version=17,
            input_names=["image"], output_names=["z", "unary_logits"], dynamic_axes={"image": {0: "batch"}},
        )
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        ref = model(x)[0].numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-5
