"""StemConv2d: the stem's weight gradient as im2col + GEMM on a CPU, the same numbers as torch's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cxrloc.model.backbone import create_backbone
from cxrloc.model.stem_conv import StemConv2d

REAL_IMAGE = next((Path(__file__).resolve().parent / "fixtures" / "real" / "tbx11k" / "imgs").rglob("*.png"))


def _real_batch(side: int, n: int = 3) -> torch.Tensor:
    """``n`` crops of a real chest X-ray (the TBX11K fixture), scaled to [-1, 1] as cxrloc's cache is."""
    img = np.asarray(Image.open(REAL_IMAGE).convert("L").resize((2 * side, 2 * side)), dtype=np.float32)
    x = torch.from_numpy(img / 127.5 - 1.0)
    crops = [x[i * side // 2 : i * side // 2 + side, i * side // 3 : i * side // 3 + side] for i in range(n)]
    return torch.stack(crops)[:, None].contiguous()


def _pair(conv_kw: dict, seed: int = 0) -> tuple[StemConv2d, nn.Conv2d]:
    torch.manual_seed(seed)
    fast = StemConv2d(**conv_kw)
    plain = nn.Conv2d(**conv_kw)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "conv_kw",
    [
        {"in_channels": 1, "out_channels": 8, "kernel_size": 7, "stride": 2, "padding": 3, "bias": False},
        {"in_channels": 1, "out_channels": 5, "kernel_size": 3, "stride": 1, "padding": 1, "bias": True},
        {"in_channels": 3, "out_channels": 4, "kernel_size": (5, 3), "stride": (2, 1), "padding": (2, 0), "bias": True},
    ],
)
def test_weight_gradient_matches_torch_on_a_real_image(conv_kw: dict, channels_last: bool) -> None:
    fast, plain = _pair(conv_kw)
    x = _real_batch(33)  # odd side: the strided output does not tile the input exactly
    if conv_kw["in_channels"] > 1:
        x = torch.cat([x, x.flip(-1), x.flip(-2)], dim=1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fast.to(memory_format=torch.channels_last)
        plain.to(memory_format=torch.channels_last)
    y_fast, y_plain = fast(x), plain(x)
    assert y_fast.grad_fn is not None and "UnfoldWeightGrad" in type(y_fast.grad_fn).__name__
    torch.testing.assert_close(y_fast, y_plain, rtol=0, atol=0)  # the same F.conv2d forward
    # A loss whose gradient differs at every output: a random weighting of a non-linear function.
    w = torch.randn(y_plain.shape, generator=torch.Generator().manual_seed(1))
    (w * y_fast.tanh()).sum().backward()
    (w * y_plain.tanh()).sum().backward()
    g_fast, g_plain = fast.weight.grad, plain.weight.grad
    assert g_fast.shape == g_plain.shape
    # Sums of B*L float32 products in another order: relative to the gradient's scale.
    scale = g_plain.abs().max()
    assert (g_fast - g_plain).abs().max() <= 2e-5 * scale
    assert g_fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if conv_kw["bias"]:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-6)


def test_weight_gradient_against_a_float64_sum() -> None:
    """An independent computation: the gradient of sum(go * conv(x, w)) is sum over b, y, x of go times
    the input patch; worked out with explicit float64 patches."""
    torch.manual_seed(0)
    conv = StemConv2d(1, 3, kernel_size=3, stride=2, padding=1, bias=False)
    x = _real_batch(9, n=2)
    y = conv(x)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (go * y).sum().backward()
    xp = F.pad(x.double(), (1, 1, 1, 1))
    want = torch.zeros(3, 1, 3, 3, dtype=torch.float64)
    for b in range(2):
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                patch = xp[b, 0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
                want[:, 0] += go[b, :, i, j].double()[:, None, None] * patch
    torch.testing.assert_close(conv.weight.grad.double(), want, rtol=1e-6, atol=1e-6)


def test_plain_convolution_where_the_fast_path_does_not_apply() -> None:
    torch.manual_seed(0)
    conv = StemConv2d(1, 4, kernel_size=7, stride=2, padding=3, bias=False)
    x = _real_batch(32)

    def grad_fn_name(y: torch.Tensor) -> str:
        return type(y.grad_fn).__name__ if y.grad_fn is not None else "none"

    assert "UnfoldWeightGrad" in grad_fn_name(conv(x))
    assert grad_fn_name(conv(x.requires_grad_(True))) == "ConvolutionBackward0"  # input needs its gradient
    x = x.detach()
    with torch.no_grad():
        assert grad_fn_name(conv(x)) == "none"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert "UnfoldWeightGrad" not in grad_fn_name(y) and y.dtype == torch.bfloat16
    conv.weight.requires_grad_(False)
    assert grad_fn_name(conv(x)) == "none"
    conv.weight.requires_grad_(True)
    assert grad_fn_name(conv.double()(x.double())) == "ConvolutionBackward0"  # float64: the plain path


def test_backbone_stem_is_a_stem_conv_with_torchvision_names() -> None:
    net, _ = create_backbone("resnet18", width=8, init="scratch")
    assert isinstance(net.conv1, StemConv2d) and isinstance(net.conv1, nn.Conv2d)
    assert "conv1.weight" in net.state_dict()
    # A training step of the backbone goes through the fast path and gives every stem weight a gradient.
    x = _real_batch(64, n=2)
    net(x).square().mean().backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0


def test_crf_guidance_branch_first_conv_is_a_stem_conv() -> None:
    """The PAC-CRF's guidance branch also starts on the image: its first convolution takes the fast path."""
    from cxrloc.model.pac_crf import GuidanceBranch

    branch = GuidanceBranch(image_size=64, patch_grid=8, channels=8, feature_dim=4)
    first = branch.stages[0][0]
    assert isinstance(first, StemConv2d) and not isinstance(branch.stages[1][0], StemConv2d)
    assert "stages.0.0.weight" in branch.state_dict()
    y = first(_real_batch(64, n=2))
    assert "UnfoldWeightGrad" in type(y.grad_fn).__name__
