"""The stem convolution with a fast weight gradient on a CPU.

A ResNet's first convolution (7 x 7, stride 2, one input channel here) is cheap forward, but
oneDNN's CPU kernel for its weight gradient is not: with a single input channel it reaches about
5 GFLOP/s on an AVX2 core (17 ms of a 390 ms training step at 128 px, 55 ms at 256 px; a 3 x 3
convolution's weight gradient runs at 35-55). The image needs no gradient, so that weight gradient
is the stem's whole backward. :class:`StemConv2d` computes it as one im2col (``F.unfold``) and a
batched GEMM (MKL), about twice as fast, whenever it trains in float32 on a CPU; everywhere else
(CUDA, autocast, inference, ONNX export, ``torch.compile``, an input that needs a gradient) it is
a plain ``nn.Conv2d``. The forward is ``F.conv2d`` in every case, and the weight gradient equals
oneDNN's up to the order of float32 sums (``tests/test_model_stem_conv.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class _UnfoldWeightGrad(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride, padding)`` whose backward computes only the weight's and
    the bias's gradients, the weight's as im2col + GEMM (``x`` must not need a gradient)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.conf = (tuple(weight.shape), stride, padding, bias is not None, weight.is_contiguous())  # type: ignore[attr-defined]
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[None, torch.Tensor, torch.Tensor | None, None, None]:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        shape, stride, padding, has_bias, nchw = ctx.conf  # type: ignore[attr-defined]
        out_ch = shape[0]
        b = x.shape[0]
        cols = F.unfold(x, shape[2:], padding=padding, stride=stride)  # (B, C*kh*kw, L)
        # (B, L, O): a view when grad is channels-last, one copy otherwise.
        g = grad.permute(0, 2, 3, 1).reshape(b, -1, out_ch)
        gw = torch.bmm(cols, g).sum(0).t().reshape(shape)
        if not nchw:
            gw = gw.contiguous(memory_format=torch.channels_last)
        gb = grad.sum((0, 2, 3)) if has_bias else None
        return None, gw, gb, None, None


class StemConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) whose weight gradient is im2col + GEMM when it
    trains in float32 on a CPU with an input that needs no gradient (the image); see the module
    docstring for why and where."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_path(x):
            return _UnfoldWeightGrad.apply(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)

    def _fast_path(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and not x.requires_grad
            and x.dim() == 4
            and self.groups == 1
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling()
        )
