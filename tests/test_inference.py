"""Batched inference on prepared images: preprocessing, and test-time augmentation (views mapped
back to the original frame before averaging)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrloc.inference.batch import TTA_TRANSFORMS, forward_tta
from cxrloc.utils import CxrlocError

P = 16


class PoolNet(torch.nn.Module):
    """An exactly equivariant 'network': z = the input, area-pooled to a P x P grid, in (0, 1)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = (F.adaptive_avg_pool2d(x, P) + 1) / 2
        return z.repeat(1, 3, 1, 1), z


def _blob(size: int = 128) -> torch.Tensor:
    """A smooth bright blob off centre, background -1 (as a radiograph's border)."""
    r = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return (2 * torch.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2) / 0.05) - 1)[None, None]


def _centroid(z: torch.Tensor) -> torch.Tensor:
    """Centre of mass (x, y) of a P x P map, in patches."""
    w = z[0, 0]
    idx = torch.arange(P, dtype=w.dtype)
    return torch.stack([(w.sum(0) * idx).sum() / w.sum(), (w.sum(1) * idx).sum() / w.sum()])


def test_each_view_maps_back_to_the_original_frame() -> None:
    x = _blob()
    plain = forward_tta(PoolNet(), x, 1)
    assert torch.equal(plain, PoolNet()(x)[0])
    c0 = _centroid(plain)
    for s, tx, ty in TTA_TRANSFORMS[1:]:
        back = forward_tta(PoolNet(), x, [(s, tx, ty)])
        assert torch.allclose(_centroid(back), c0, atol=0.08), (s, tx, ty)
        # What the network saw is displaced: by tx / 2 of the side for a shift (0.4 patch here).
        seen = PoolNet()(F.grid_sample(x, F.affine_grid(torch.tensor([[[s, 0, tx], [0, s, ty]]]), [1, 1, 128, 128],
                                                           align_corners=False), align_corners=False,
                                       padding_mode="border"))[0]
        if s == 1.0:
            shift = _centroid(seen) - c0
            assert torch.allclose(shift, -torch.tensor([tx, ty]) * P / 2, atol=0.08)
    z = forward_tta(PoolNet(), x, len(TTA_TRANSFORMS))
    assert torch.allclose(_centroid(z), c0, atol=0.05)


def test_tta_bounds() -> None:
    with pytest.raises(CxrlocError, match="tta must be between 1"):
        forward_tta(PoolNet(), _blob(), 0)
    with pytest.raises(CxrlocError):
        forward_tta(PoolNet(), _blob(), len(TTA_TRANSFORMS) + 1)


def test_predict_prepared_scales_and_area_resizes() -> None:
    from cxrloc.inference.batch import predict_prepared

    class Echo(torch.nn.Module):
        """Returns its input as ``z`` so the preprocessing can be checked."""

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class Cache:
        def __init__(self) -> None:
            rng = np.random.default_rng(3)
            self.data = {i: rng.integers(0, 256, (8, 8), dtype=np.uint8) for i in ("p", "q", "r")}

        def image(self, image_id: str) -> np.ndarray:
            return self.data[image_id]

    cache = Cache()
    z = predict_prepared(Echo(), cache, ["r", "p", "q"], image_size=4, batch_size=2, progress=False)
    assert z.shape == (3, 1, 4, 4) and z.dtype == np.float32
    for n, i in enumerate(["r", "p", "q"]):
        x = cache.data[i].astype(np.float64) / 127.5 - 1.0
        expected = x.reshape(4, 2, 4, 2).mean(axis=(1, 3))  # 2x2 box filter
        np.testing.assert_allclose(z[n, 0], expected, atol=1e-6)
