"""Anti-aliasing blur-pool (Zhang 2019, "Making convolutional networks shift-invariant again").

A fixed binomial low-pass filter applied depthwise before subsampling. The filter is a
buffer of fixed size (not a parameter), so the layer exports to ONNX as a plain ``Pad`` +
grouped ``Conv``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def binomial_filter(size: int) -> torch.Tensor:
    """1-D binomial filter of ``size`` taps, normalised to sum 1 (row ``size - 1`` of Pascal's triangle).

    Example:
        >>> binomial_filter(3).tolist()
        [0.25, 0.5, 0.25]
    """
    if size < 1:
        raise ValueError(f"blur filter size must be >= 1, got {size}")
    coeffs = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64)
    return (coeffs / coeffs.sum()).float()


class BlurPool2d(nn.Module):
    """Depthwise binomial blur followed by subsampling with ``stride``.

    Args:
        channels: number of input (= output) channels.
        filt_size: taps of the binomial filter per axis (Zhang uses 3 to 5; 1 = plain subsampling).
        stride: subsampling factor.
        pad_mode: ``"reflect"`` (Zhang's default) or ``"zeros"``.

    The output side is ``ceil(H / stride)`` for stride 2, the same as a stride-2 conv with
    "same" padding, so swapping a strided layer for stride 1 + blur-pool keeps every shape.
    """

    def __init__(self, channels: int, filt_size: int = 3, stride: int = 2, pad_mode: str = "reflect") -> None:
        super().__init__()
        if pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zeros', got {pad_mode!r}")
        self.channels = channels
        self.filt_size = filt_size
        self.stride = stride
        self.pad_mode = pad_mode
        # Asymmetric padding for even sizes, as in Zhang's reference code.
        lo, hi = (filt_size - 1) // 2, filt_size // 2
        self.padding = (lo, hi, lo, hi)
        a = binomial_filter(filt_size)
        kernel = torch.outer(a, a)[None, None].repeat(channels, 1, 1, 1)
        # Non-persistent: the filter is fully determined by the hyper-parameters, and keeping it out of
        # the state dict lets plain torchvision weights load into an anti-aliased network.
        self.register_buffer("filt", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.filt_size > 1:
            mode = "reflect" if self.pad_mode == "reflect" else "constant"
            x = F.pad(x, self.padding, mode=mode)
        return F.conv2d(x, self.filt.to(dtype=x.dtype), stride=self.stride, groups=self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, filt_size={self.filt_size}, stride={self.stride}, pad_mode={self.pad_mode}"


class BlurConv2d(nn.Conv2d):
    """A ``Conv2d`` that first blur-pools its input with ``stride`` and then convolves with stride 1.

    It takes the place of an existing convolution while keeping its parameter names (``weight``,
    ``bias``), so torchvision state dicts load unchanged.
    """

    def __init__(self, conv: nn.Conv2d, stride: int = 2, filt_size: int = 3, pad_mode: str = "reflect") -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=1,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.blur = BlurPool2d(conv.in_channels, filt_size, stride, pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.blur(x))
