"""CpuConv2d: faster weight gradients on a CPU, the same numbers as torch's own convolution backward."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cxrloc.config import make_config
from cxrloc.model.backbone import create_backbone
from cxrloc.model.blurpool import BlurConv2d
from cxrloc.model.cpu_conv import THIN_INPUT, CpuConv2d, use_cpu_convs, weight_gradient
from cxrloc.model.net import build_model

REAL_IMAGE = next((Path(__file__).resolve().parent / "fixtures" / "real" / "tbx11k" / "imgs").rglob("*.png"))


def _real_batch(side: int, n: int = 3, width: int | None = None) -> torch.Tensor:
    """``n`` crops of a real chest X-ray (the TBX11K fixture), scaled to [-1, 1] as cxrloc's cache is."""
    width = width or side
    big = 2 * max(side, width)
    img = np.asarray(Image.open(REAL_IMAGE).convert("L").resize((big, big)), dtype=np.float32)
    x = torch.from_numpy(img / 127.5 - 1.0)
    rows, cols = [i * side // n for i in range(n)], [i * width // (n + 1) for i in range(n)]
    crops = [x[r : r + side, c : c + width] for r, c in zip(rows, cols, strict=True)]
    return torch.stack(crops)[:, None].contiguous()


def _real_features(channels: int, side: int, width: int | None = None, n: int = 2) -> torch.Tensor:
    """Feature maps of a real image: a fixed random 3x3 convolution and ReLU of the crops (channels >= 2)."""
    x = _real_batch(side + 2, n, (width or side) + 2)
    w = torch.randn(channels, 1, 3, 3, generator=torch.Generator().manual_seed(channels))
    return F.relu(F.conv2d(x, w))


def _torch_grads(x: torch.Tensor, conv: nn.Conv2d, go: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_(True)
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return torch.autograd.grad(y, (x, conv.weight), go)


def test_weight_gradient_against_a_float64_sum() -> None:
    """An independent computation: d/dw sum(go * conv(x, w)) = sum over b, y, x of go times the input
    patch, with explicit float64 patches; for the thin-input path (im2col + GEMM) at strides 1 and 2, and
    for oneDNN's path (the same function on a wider input)."""
    x = _real_features(3, 9, 7)
    go = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(2))
    xp = F.pad(x.double(), (1, 1, 1, 1))
    want = torch.zeros(4, 3, 3, 3, dtype=torch.float64)
    for b in range(2):
        for i in range(9):
            for j in range(7):
                want += go[b, :, i, j].double()[:, None, None, None] * xp[b, None, :, i : i + 3, j : j + 3]
    weight = torch.zeros(4, 3, 3, 3)
    got = weight_gradient(x, go, weight, ((1, 1), (1, 1), (1, 1), 1))  # 3 channels <= THIN_INPUT
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Above THIN_INPUT, oneDNN's kernel: the same sum with the channels repeated.
    reps = THIN_INPUT // 3 + 1
    wide = weight_gradient(x.repeat(1, reps, 1, 1), go, weight.repeat(1, reps, 1, 1), ((1, 1), (1, 1), (1, 1), 1))
    torch.testing.assert_close(wide.double(), want.repeat(1, reps, 1, 1), rtol=1e-5, atol=1e-5)
    # The thin-input path, stride 2: every second output of the same sum.
    go2 = go[:, :, ::2, ::2].contiguous()
    want2 = torch.zeros_like(want)
    for b in range(2):
        for i in range(5):
            for j in range(4):
                patch = xp[b, None, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
                want2 += go2[b, :, i, j].double()[:, None, None, None] * patch
    got2 = weight_gradient(x, go2, weight, ((2, 2), (1, 1), (1, 1), 1))
    torch.testing.assert_close(got2.double(), want2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "conv_kw",
    [
        {"in_channels": 1, "out_channels": 8, "kernel_size": 7, "stride": 2, "padding": 3, "bias": False},  # stem
        {"in_channels": 1, "out_channels": 5, "kernel_size": 3, "stride": 2, "padding": 1, "bias": False},  # CRF
        {"in_channels": 12, "out_channels": 10, "kernel_size": 3, "stride": 1, "padding": 1, "bias": True},
        {"in_channels": 12, "out_channels": 6, "kernel_size": 1, "stride": 1, "padding": 0, "bias": False},
    ],
)
def test_cpu_conv_step_matches_nn_conv2d(conv_kw: dict, channels_last: bool) -> None:
    torch.manual_seed(0)
    fast = CpuConv2d(**conv_kw)
    plain = nn.Conv2d(**conv_kw)
    plain.load_state_dict(fast.state_dict())
    c = conv_kw["in_channels"]
    x = _real_batch(33) if c == 1 else _real_features(c, 15, 13)  # odd sides
    needs_input_grad = c > 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fast.to(memory_format=torch.channels_last)
        plain.to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(needs_input_grad), x.clone().requires_grad_(needs_input_grad)
    y_fast, y_plain = fast(xa), plain(xb)
    thin = c <= THIN_INPUT  # only those take the fast path; the others are plain convolutions
    assert ("CpuConvFunction" in type(y_fast.grad_fn).__name__) == thin
    torch.testing.assert_close(y_fast, y_plain, rtol=0, atol=0)  # the same F.conv2d forward
    w = torch.randn(y_plain.shape, generator=torch.Generator().manual_seed(1))
    (w * y_fast.tanh()).sum().backward()
    (w * y_plain.tanh()).sum().backward()
    g_fast, g_plain = fast.weight.grad, plain.weight.grad
    assert (g_fast - g_plain).abs().max() <= 2e-5 * g_plain.abs().max()
    if not thin:
        assert torch.equal(g_fast, g_plain)
    assert g_fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if needs_input_grad:
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6 * float(xb.grad.abs().max()))
    if conv_kw["bias"]:
        # The bias's gradient is the output gradient summed per channel: against that sum in float64,
        # each within float32 summation error (n u sum|terms|, n = B*H*W).
        go = (w * (1 - y_plain.detach().tanh() ** 2)).double()
        want, size = go.sum((0, 2, 3)), go[:, 0].numel() * 6e-8 * go.abs().sum((0, 2, 3))
        assert ((fast.bias.grad.double() - want).abs() <= size + 1e-12).all()
        assert ((plain.bias.grad.double() - want).abs() <= size + 1e-12).all()


def test_thin_input_weight_gradient_is_deterministic() -> None:
    conv = CpuConv2d(1, 8, kernel_size=7, stride=2, padding=3, bias=False)
    x = _real_batch(40)
    grads = []
    for _ in range(2):
        conv.weight.grad = None
        conv(x).tanh().sum().backward()
        grads.append(conv.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_plain_convolution_where_the_fast_path_does_not_apply() -> None:
    torch.manual_seed(0)
    conv = CpuConv2d(1, 4, kernel_size=7, stride=2, padding=3, bias=False)
    x = _real_batch(32)

    def grad_fn_name(y: torch.Tensor) -> str:
        return type(y.grad_fn).__name__ if y.grad_fn is not None else "none"

    assert "CpuConvFunction" in grad_fn_name(conv(x))
    with torch.no_grad():
        assert grad_fn_name(conv(x)) == "none"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert "CpuConvFunction" not in grad_fn_name(y) and y.dtype == torch.bfloat16
    conv.weight.requires_grad_(False)
    assert grad_fn_name(conv(x)) == "none"
    conv.weight.requires_grad_(True)
    assert grad_fn_name(conv.double()(x.double())) == "ConvolutionBackward0"  # float64: the plain path


def test_networks_use_cpu_convs_with_unchanged_state_dicts() -> None:
    net = build_model(make_config("tiny"))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    thin = [m for m in convs if m.in_channels <= THIN_INPUT]
    assert thin == [net.unary.backbone.conv1, net.crf.branch.stages[0][0]]  # the two convolutions on the image
    assert all(isinstance(m, CpuConv2d) for m in convs if not isinstance(m, BlurConv2d))
    backbone, _ = create_backbone("resnet18", width=8, init="scratch", antialias=False)
    assert isinstance(backbone.conv1, CpuConv2d) and "conv1.weight" in backbone.state_dict()
    # use_cpu_convs changes the class only: the same state dict, idempotent.
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1))
    state = copy.deepcopy(plain.state_dict())
    use_cpu_convs(use_cpu_convs(plain))
    assert type(plain[0]) is CpuConv2d and type(plain[2]) is CpuConv2d and type(plain[1]) is nn.BatchNorm2d
    assert state.keys() == plain.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())


def test_a_training_step_of_the_network_matches_plain_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole `tiny` network (blur-pool, head, PAC-CRF) in channels-last: every parameter's gradient
    with the CPU convolutions against the same network with plain ones."""
    torch.manual_seed(0)
    net = build_model(make_config("tiny")).train().to(memory_format=torch.channels_last)
    ref = copy.deepcopy(net)
    x = _real_batch(64, n=4).contiguous(memory_format=torch.channels_last)
    z, unary = net(x)
    (z.square().mean() + unary.tanh().mean()).backward()
    monkeypatch.setattr(CpuConv2d, "_fast_path", lambda self, x: False)
    z2, unary2 = ref(x)
    (z2.square().mean() + unary2.tanh().mean()).backward()
    torch.testing.assert_close(z, z2, rtol=0, atol=0)
    for (name, p), p2 in zip(net.named_parameters(), ref.parameters(), strict=True):
        if p2.grad is None:
            assert p.grad is None, name
            continue
        scale = float(p2.grad.abs().max())
        assert float((p.grad - p2.grad).abs().max()) <= 1e-4 * scale + 1e-9, name
