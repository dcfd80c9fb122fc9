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


def _padded_reference(x: torch.Tensor, size: int, stride: int, pad_mode: str) -> torch.Tensor:
    """Zhang's / timm's formulation, written out: F.pad, then the strided depthwise binomial convolution."""
    a = binomial_filter(size).to(device=x.device, dtype=x.dtype)
    filt = torch.outer(a, a)[None, None].repeat(x.shape[1], 1, 1, 1)
    lo, hi = (size - 1) // 2, size // 2
    padded = F.pad(x, (lo, hi, lo, hi), mode="reflect" if pad_mode == "reflect" else "constant")
    return F.conv2d(padded, filt, stride=stride, groups=x.shape[1])


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
@pytest.mark.parametrize(
    ("size", "stride", "h", "w"),
    [
        (3, 2, 16, 16), (3, 2, 15, 17), (3, 2, 2, 3), (5, 2, 9, 8), (7, 3, 11, 12), (3, 1, 7, 6),
        (4, 2, 10, 9), (2, 2, 7, 8),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_blurpool_matches_the_padded_formulation(
    pad_mode: str, size: int, stride: int, h: int, w: int, channels_last: bool
) -> None:
    """Forward and input gradient equal F.pad + conv in float32 (even sides, odd sides, tiny maps, sizes 2-7)."""
    gen = torch.Generator().manual_seed(size * 100 + h * 10 + w)
    x = torch.randn(2, 5, h, w, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_new, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    pool = BlurPool2d(5, size, stride, pad_mode)
    y, y_ref = pool(x_new), _padded_reference(x_ref, size, stride, pad_mode)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(y.shape, generator=gen)
    if channels_last:
        upstream = upstream.contiguous(memory_format=torch.channels_last)  # as the next layer would send it
    (g,) = torch.autograd.grad(y, x_new, upstream)
    (g_ref,) = torch.autograd.grad(y_ref, x_ref, upstream)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    if channels_last and size == 3 and stride == 2 and h > 2:
        # no padded NCHW copy on the way: the layout of the network is kept, forward and backward
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert g.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("size", "h", "w"), [(3, 16, 15), (5, 9, 8)])
def test_blurpool_bf16_on_cpu_runs_its_depthwise_kernels_in_float32(
    channels_last: bool, size: int, h: int, w: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 on a CPU (training under autocast): the backward's transposed depthwise convolutions (and
    the forward's border strips) get float32 channels-last operands (torch's bf16 CPU kernels for these are
    10 to 60 times slower), and the results are the float64 reference's within bf16 rounding.

    Bound: the main convolution rounds its output to bf16 once and each border correction adds one more
    rounding, so at most 3 roundings of u = 2^-8 of the largest value."""
    seen: list[tuple[torch.dtype, bool]] = []
    for name in ("conv2d", "conv_transpose2d"):
        op = getattr(F, name)

        def recording(x: torch.Tensor, *args: object, _op: object = op, **kw: object) -> torch.Tensor:
            seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last)))
            return _op(x, *args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(F, name, recording)
    gen = torch.Generator().manual_seed(size * 10 + h)
    x = torch.randn(2, 6, h, w, generator=gen).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_new = x.clone().requires_grad_()
    x_ref = x.double().requires_grad_()
    pool = BlurPool2d(6, size, 2)
    y = pool(x_new)
    y_ref = _padded_reference(x_ref, size, 2, "reflect")
    assert y.dtype == torch.bfloat16
    u = 2.0**-8
    assert float((y.double() - y_ref).abs().max()) <= 3 * u * float(y_ref.abs().max())
    upstream = torch.randn(y.shape, generator=gen).bfloat16()
    seen.clear()
    (g,) = torch.autograd.grad(y, x_new, upstream)
    (g_ref,) = torch.autograd.grad(y_ref, x_ref, upstream.double())
    assert g.dtype == torch.bfloat16 and g.shape == x.shape
    assert float((g.double() - g_ref).abs().max()) <= 3 * u * float(g_ref.abs().max())
    # every depthwise operation of the backward ran on float32 channels-last operands
    assert seen and all(dtype == torch.float32 and cl for dtype, cl in seen)


def test_folded_reflect_blurpool_gradcheck() -> None:
    """The hand-written backward of the folded reflect padding is the exact adjoint (float64 gradcheck)."""
    gen = torch.Generator().manual_seed(0)
    for size, stride, h, w in ((3, 2, 6, 7), (5, 2, 7, 6), (3, 3, 5, 5)):
        pool = BlurPool2d(2, size, stride).double()
        x = torch.randn(1, 2, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(pool, (x,))


def test_blurpool_border_by_hand() -> None:
    """Reflect padding at an even side, stride 2, [1 2 1]/4: the first output is (x0 + x1) / 2 per axis."""
    x = torch.arange(16.0).view(1, 1, 4, 4) ** 2  # non-linear, so that a wrong border weight shows
    y = BlurPool2d(1, 3, 2)(x)
    row = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 0.5, 0.25]])  # outputs 0, 1 of one axis
    torch.testing.assert_close(y[0, 0], row @ x[0, 0] @ row.T)


@pytest.mark.cuda
def test_blurpool_on_cuda_bf16_channels_last() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 64, 64, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
    pool = BlurPool2d(64, 3, 2).cuda().to(memory_format=torch.channels_last)
    y = pool(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), _padded_reference(x, 3, 2, "reflect"), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(pool(x), _padded_reference(x, 3, 2, "reflect"), rtol=1e-5, atol=1e-5)
