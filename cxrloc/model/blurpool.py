"""Anti-aliasing blur-pool (Zhang 2019, "Making convolutional networks shift-invariant again").

A fixed binomial low-pass filter applied depthwise before subsampling. The filter is a
buffer of fixed size (not a parameter), so the layer exports to ONNX as a plain ``Pad`` +
grouped ``Conv``.

How it is computed (the result is that of ``F.pad(x, mode="reflect")`` followed by the strided
depthwise convolution, Zhang's and timm's ``BlurPool2d`` design, within float rounding):

- odd filter sizes (3, the default, 5, 7) with reflect padding: one depthwise convolution with
  **zero** padding folded into it, plus an exact correction of the few border rows and columns
  whose window reaches beyond the image (:class:`_ReflectBlurPool`, with a hand-written backward).
  Reflect padding is separable, ``A_r = A_0 + D`` per axis with ``D`` non-zero only at the
  borders, so ``A_r,y X A_r,x^T = A_0,y X A_0,x^T + D_y X A_r,x^T + A_0,y X D_x^T``: the last two
  terms read one strip of ``r = size // 2`` rows or columns. For an even side, stride 2 and
  size 3, only the first row and column change (``out[0] = (x[0] + x[1]) / 2`` per axis). No
  separate padded copy of the input is made, and a channels-last input stays channels-last;
- zero padding with an odd size: the padding is the convolution's own;
- even filter sizes (asymmetric padding), size 1, inputs no larger than the padding, and ONNX
  export: ``F.pad`` + convolution, as before.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


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


@functools.lru_cache(maxsize=512)
def _reflect_border(n: int, size: int, stride: int) -> tuple[tuple[int, int, float], ...]:
    """Non-zero entries ``(i, j, d)`` of ``D = A_reflect - A_zero`` for one axis of length ``n``.

    ``A`` maps ``n`` input samples to the strided, ``size``-tap binomial blur with ``r = size // 2``
    samples of padding on both sides; ``D`` holds what reflect padding adds over zero padding:
    output ``i`` receives ``d * x[j]`` from the padded samples that mirror ``x[j]``.
    """
    # The binomial taps C(size-1, t) / 2^(size-1): dyadic, so exactly the float32 values of the filter
    # (plain Python, so that torch.compile folds this function instead of breaking its graph).
    taps = [math.comb(size - 1, t) / 2 ** (size - 1) for t in range(size)]
    r = (size - 1) // 2
    m = (n + 2 * r - size) // stride + 1
    entries: dict[tuple[int, int], float] = {}
    for i in range(m):
        for t, a in enumerate(taps):
            u = stride * i + t - r
            if 0 <= u < n:
                continue
            j = -u if u < 0 else 2 * (n - 1) - u
            entries[(i, j)] = entries.get((i, j), 0.0) + a
    return tuple((i, j, d) for (i, j), d in sorted(entries.items()))


def _sources(entries: tuple[tuple[int, int, float], ...]) -> list[int]:
    return sorted({j for _, j, _ in entries})


def _gather(x: torch.Tensor, dim: int, index: list[int]) -> torch.Tensor:
    """``x`` restricted to ``index`` along ``dim`` (a few slices; no index tensor, so no host-to-device copy)."""
    return torch.cat([x.narrow(dim, j, 1) for j in index], dim=dim)


class _ReflectBlurPool(torch.autograd.Function):
    """Reflect-padded depthwise blur with stride, as zero-padded convolution + border corrections.

    Odd ``size`` only (symmetric padding ``r = size // 2``); see the module docstring for the algebra.
    Arguments: the input, the 2-D filter ``(C, 1, size, size)`` and its 1-D factors along x
    ``(C, 1, 1, size)`` and y ``(C, 1, size, 1)`` (all in the input's dtype), ``size`` and ``stride``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        filt: torch.Tensor,
        row: torch.Tensor,
        col: torch.Tensor,
        size: int,
        stride: int,
    ) -> torch.Tensor:
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        r = (size - 1) // 2
        ctx.save_for_backward(filt, row, col)
        ctx.meta = (tuple(x.shape), size, stride)  # type: ignore[attr-defined]
        out = F.conv2d(x, filt, stride=stride, padding=r, groups=c)
        rows, cols = _reflect_border(h, size, stride), _reflect_border(w, size, stride)
        if rows:
            # D_y X A_r,x^T: the mirrored rows, blurred along x with reflect padding (a thin strip).
            src = _sources(rows)
            strip = F.pad(_gather(x, 2, src), (r, r, 0, 0), mode="reflect")
            blurred = _depthwise(F.conv2d, strip, row, stride=(1, stride), groups=c)
            for i, j, d in rows:
                out[:, :, i].add_(blurred[:, :, src.index(j)], alpha=d)
        if cols:
            # A_0,y X D_x^T: the mirrored columns, blurred along y with zero padding.
            src = _sources(cols)
            blurred = _depthwise(F.conv2d, _gather(x, 3, src), col, stride=(stride, 1), padding=(r, 0), groups=c)
            for i, j, d in cols:
                out[:, :, :, i].add_(blurred[:, :, :, src.index(j)], alpha=d)
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, None, None]:
        filt, row, col = ctx.saved_tensors  # type: ignore[attr-defined]
        shape, size, stride = ctx.meta  # type: ignore[attr-defined]
        c, h, w = shape[1], shape[2], shape[3]
        r = (size - 1) // 2
        # A_0,y^T G A_0,x: the adjoint of the zero-padded convolution (keeps grad's memory format).
        gx = _conv_adjoint(grad, filt, (h, w), (stride, stride), (r, r), c)
        rows, cols = _reflect_border(h, size, stride), _reflect_border(w, size, stride)
        if rows:
            # D_y^T G A_r,x: the corrected output rows combined per mirrored input row, then the adjoint
            # of the reflect-padded blur along x (the zero-padded adjoint, its mirrored margins folded back).
            src = _sources(rows)
            comb = torch.stack([_combine(grad, 2, rows, j) for j in src], dim=2)
            padded = _conv_adjoint(comb, row, (len(src), w + 2 * r), (1, stride), (0, 0), c)
            strip = padded[..., r : r + w].clone()
            for p in range(r):
                strip[..., r - p] += padded[..., p]  # left margin: padded column p mirrors x[r - p]
                strip[..., w - 2 - p] += padded[..., r + w + p]  # right margin: padded r + w + p mirrors x[w - 2 - p]
            for k, j in enumerate(src):
                gx[:, :, j].add_(strip[:, :, k])
        if cols:
            # A_0,y^T G D_x: the corrected output columns combined per mirrored input column, then the
            # adjoint of the zero-padded blur along y.
            src = _sources(cols)
            comb = torch.stack([_combine(grad, 3, cols, j) for j in src], dim=3)
            strip = _conv_adjoint(comb, col, (h, len(src)), (stride, 1), (r, 0), c)
            for k, j in enumerate(src):
                gx[:, :, :, j].add_(strip[:, :, :, k])
        return gx, None, None, None, None, None


def _conv_adjoint(
    grad: torch.Tensor, filt: torch.Tensor, size: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int], c: int
) -> torch.Tensor:
    """Adjoint of the depthwise ``F.conv2d(., filt, stride, pad, groups=c)`` on an input of spatial ``size``."""
    k = filt.shape[-2:]
    extra = tuple(size[d] - ((grad.shape[2 + d] - 1) * stride[d] - 2 * pad[d] + k[d]) for d in range(2))
    return _depthwise(F.conv_transpose2d, grad, filt, stride=stride, padding=pad, output_padding=extra, groups=c)


def _depthwise(op: Callable[..., torch.Tensor], x: torch.Tensor, filt: torch.Tensor, **kw: Any) -> torch.Tensor:
    """``op(x, filt, **kw)`` (a depthwise ``F.conv2d`` or ``F.conv_transpose2d``), in float32 and
    channels-last for a bfloat16 / float16 input on a CPU, cast back to the input's dtype.

    torch's CPU kernels have no fast path for these in reduced precision: a depthwise transposed
    convolution (blur-pool's backward) and the thin border strips took 10 to 60 times as long in
    bfloat16 as in float32 (``bench/bench_layers.py --amp bf16 --clock process``; docs/results.md), so
    under CPU autocast they alone were a quarter of a training step. Float32 is also at least as exact.
    """
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # channels-last: torch's CPU depthwise kernels are several times faster in that layout.
        x32 = x.float().contiguous(memory_format=torch.channels_last)
        return op(x32, filt.float(), **kw).to(x.dtype)
    return op(x, filt, **kw)


def _combine(grad: torch.Tensor, dim: int, entries: tuple[tuple[int, int, float], ...], j: int) -> torch.Tensor:
    """``sum_i d_ij grad[i]`` along ``dim`` (2: rows, 3: columns) for the entries that mirror input ``j``."""
    parts = [grad.select(dim, i) * d for i, jj, d in entries if jj == j]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


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
        self.register_buffer("taps", a, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, r = self.filt_size, (self.filt_size - 1) // 2
        if size == 1 or size % 2 == 0:
            return self.padded_forward(x)
        filt = self.filt.to(dtype=x.dtype)
        if self.pad_mode == "zeros":
            return F.conv2d(x, filt, stride=self.stride, padding=r, groups=self.channels)
        if min(x.shape[-2:]) <= r or torch.onnx.is_in_onnx_export():
            return self.padded_forward(x)  # F.pad reports a too-small input; ONNX gets Pad(reflect) + Conv
        taps = self.taps.to(dtype=x.dtype)
        row = taps.view(1, 1, 1, size).expand(self.channels, 1, 1, size)
        col = taps.view(1, 1, size, 1).expand(self.channels, 1, size, 1)
        return _ReflectBlurPool.apply(x, filt, row, col, size, self.stride)

    def padded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The textbook formulation: ``F.pad`` (reflect or zeros), then the strided depthwise convolution."""
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
