"""Anti-aliasing: binomial filters, blur-pool behaviour and shift stability of the backbone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cxrloc.model.backbone import create_backbone
from cxrloc.model.blurpool import BlurPool2d, binomial_filter


@pytest.mark.parametrize("size", [2, 3, 4, 5, 7])
def test_binomial_filter_coefficients(size: int) -> None:
    a = binomial_filter(size)
    expected = [math.comb(size - 1, i) / 2 ** (size - 1) for i in range(size)]
    assert a.tolist() == pytest.approx(expected)
    assert float(a.sum()) == pytest.approx(1.0)
    pool = BlurPool2d(3, size)
    assert pool.filt.shape == (3, 1, size, size)
    assert float(pool.filt[1, 0].sum()) == pytest.approx(1.0)
    ref = torch.outer(torch.tensor(expected), torch.tensor(expected))
    assert torch.allclose(pool.filt[2, 0], ref.float())


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
@pytest.mark.parametrize("side", [15, 16])
def test_blurpool_shapes_and_constant(pad_mode: str, side: int) -> None:
    pool = BlurPool2d(2, 3, stride=2, pad_mode=pad_mode)
    y = pool(torch.full((1, 2, side, side), 3.0))
    assert y.shape == (1, 2, math.ceil(side / 2), math.ceil(side / 2))  # same as a "same"-padded stride-2 conv
    if pad_mode == "reflect":
        assert torch.allclose(y, torch.full_like(y, 3.0))  # a constant passes unchanged
    else:
        assert torch.allclose(y[..., 1:-1, 1:-1], torch.full_like(y[..., 1:-1, 1:-1], 3.0))


def test_blurpool_removes_nyquist_checkerboard() -> None:
    # A +/-1 checkerboard is the highest frequency: plain stride-2 subsampling aliases it to a constant 1,
    # the [1 2 1]/4 blur maps it to (1/4 - 1/2 + 1/4)^2 = 0 (reflect padding keeps the pattern at the border).
    idx = torch.arange(16)
    board = ((idx[:, None] + idx[None, :]) % 2 * 2 - 1).float()[None, None]
    assert torch.all(board[..., ::2, ::2] == -1)
    y = BlurPool2d(1, 3)(board)
    assert y.abs().max().item() < 1e-6


def _smooth_images(gen: torch.Generator, n: int, side: int) -> torch.Tensor:
    noise = torch.randn(n, 1, side, side, generator=gen)
    k = torch.exp(-0.5 * (torch.arange(-6, 7.0) / 2.0) ** 2)
    k = k / k.sum()
    img = F.conv2d(F.conv2d(noise, k.view(1, 1, 1, -1), padding=(0, 6)), k.view(1, 1, -1, 1), padding=(6, 0))
    return img / img.std()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_antialiasing_makes_features_more_shift_stable(arch: str) -> None:
    """Same weights with and without blur-pools; 1-px shifts of random smooth images, averaged."""
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        plain, _ = create_backbone(arch, 8, antialias=False, init="scratch")
    aa, _ = create_backbone(arch, 8, antialias=True, init="scratch")
    aa.load_state_dict(plain.state_dict())  # anti-aliasing adds no parameters
    plain.eval()
    aa.eval()
    img = _smooth_images(gen, 3, 112)
    change = {}
    for name, net in (("plain", plain), ("aa", aa)):
        with torch.no_grad():
            feats = [net(img[:, :, 8 + d : 8 + d + 96, 8 + d : 8 + d + 96]) for d in range(6)]
        rel = [((feats[i] - feats[i + 1]).norm() / feats[i].norm()).item() for i in range(5)]
        change[name] = sum(rel) / len(rel)
    # Measured ~8x more stable (resnet18: 0.36 vs 0.046); require 2x.
    assert change["aa"] < 0.5 * change["plain"], change
