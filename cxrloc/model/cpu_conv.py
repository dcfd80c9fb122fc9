"""Convolutions on the image with a faster weight gradient on a CPU.

oneDNN's CPU convolutions run the forward pass and the input gradient near a core's GEMM speed, the
weight gradient at about half of it, and the weight gradient of a convolution whose input has a
single channel (the ResNet stem on the X-ray, the PAC-CRF's guidance branch) at a tenth
(``bench/bench_conv_shapes.py``; on an AVX2 core: 60-85 GFLOP/s forward, 25-55 for a 3x3 layer's
weight gradient, 4-6 for the stem's, against 60-80 for MKL's GEMM): the stem's weight gradient was
20-24 ms of a 330-390 ms `cpu`-preset training step at 128 px. :class:`CpuConv2d` is an
``nn.Conv2d`` (same parameters, same state dict) that, when it trains in float32 on a CPU with an
input of at most :data:`THIN_INPUT` channels, computes that weight gradient as im2col
(``F.unfold``) + a batched GEMM (about 2x faster: 20.6 -> 9.9 ms for the stem at 128 px) and the input
gradient, when one is needed, with oneDNN as before. The forward is ``F.conv2d`` in every case.
Every other convolution, and every ``CpuConv2d`` under autocast, on CUDA, in inference, in ONNX
export, under ``torch.compile`` or tracing, is a plain ``nn.Conv2d``. The result equals oneDNN's up
to the order of float32 sums (``tests/test_model_cpu_conv.py``); the algorithm is fixed, so runs stay
deterministic.

Also measured and not kept (docs/results.md, "Weight gradients on a CPU"): GEMM formulations of the
3x3 layers' weight gradients, faster than oneDNN's alone on small maps (up to 1.3-1.5x at 8 x 8 with
128-256 channels) but not in whole training steps (``bench/bench_cpu_conv.py`` keeps them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

THIN_INPUT = 4
"""Input channels up to which :class:`CpuConv2d` computes the weight gradient as im2col + GEMM (oneDNN's
kernel for a one-channel input ran at 4-6 GFLOP/s on an AVX2 core, the GEMM path at 10-15)."""


def _onednn(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, conf: tuple) -> torch.Tensor:
    stride, padding, dilation, groups = conf
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False]
    )[1]


def _unfold_gemm(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, conf: tuple) -> torch.Tensor:
    """im2col of the whole input (``F.unfold``) and one GEMM per image, summed over the batch."""
    stride, padding, _, _ = conf
    b, out_ch = x.shape[0], weight.shape[0]
    cols = F.unfold(x, weight.shape[2:], padding=padding, stride=stride)  # (B, C*kh*kw, L)
    g = grad.permute(0, 2, 3, 1).reshape(b, -1, out_ch)  # (B, L, O): a view when grad is channels-last
    return torch.bmm(cols, g).sum(0).t().reshape(weight.shape)


def weight_gradient(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, conf: tuple) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, weight, None, *conf)`` for the output gradient ``grad`` (float32, CPU):
    im2col + GEMM for a thin input (``groups == 1``, no dilation), oneDNN's otherwise."""
    _, _, dilation, groups = conf
    if groups == 1 and dilation == (1, 1) and x.shape[1] <= THIN_INPUT:
        gw = _unfold_gemm(x, grad, weight, conf)
    else:
        gw = _onednn(x, grad, weight, conf)
    return gw.contiguous(memory_format=torch.channels_last if _is_channels_last(weight) else torch.contiguous_format)


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class _CpuConvFunction(torch.autograd.Function):
    """``F.conv2d`` whose backward takes the input gradient from oneDNN and the weight gradient from
    :func:`weight_gradient`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conf: tuple,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = conf  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return F.conv2d(x, weight, bias, *conf)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        conf = ctx.conf  # type: ignore[attr-defined]
        stride, padding, dilation, groups = conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            gx = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False]
            )[0]
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            gw = weight_gradient(x, grad, weight, conf)
        if ctx.has_bias and ctx.needs_input_grad[2]:  # type: ignore[attr-defined]
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None


class CpuConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) with a faster weight gradient when it trains in
    float32 on a CPU on an input of at most :data:`THIN_INPUT` channels; see the module docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_path(x):
            conf = (self.stride, self.padding, self.dilation, self.groups)
            return _CpuConvFunction.apply(x, self.weight, self.bias, conf)
        return super().forward(x)

    def _fast_path(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and x.dim() == 4
            and self.in_channels <= THIN_INPUT
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


def use_cpu_convs(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv2d`` inside ``module`` a :class:`CpuConv2d`, in place (the class only:
    parameters, buffers, hooks and state-dict names are untouched). Returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = CpuConv2d
    return module
