"""Convolutions whose weight gradient is computed faster on a CPU.

oneDNN's CPU convolutions run the forward pass and the input gradient near a core's GEMM speed, but
the weight gradient at about half of it, and the stem's (one input channel) at a tenth
(``bench/bench_conv_shapes.py``: on an AVX2 core 60-85 GFLOP/s forward, 25-55 for the weight
gradient, 4-6 for the stem's, against 60-80 for MKL's GEMM). The weight gradients were half of the
convolutions' time in a ``cpu``-preset training step. :class:`CpuConv2d` is an ``nn.Conv2d`` (same
parameters, same state dict) whose backward, when it trains in float32 on a CPU, computes:

- the input gradient with oneDNN, as before (when the input needs one);
- the weight gradient of a convolution on few input channels (the stem and the PAC-CRF's guidance
  branch, on the image) as im2col (``F.unfold``) + a batched GEMM, about twice as fast;
- the weight gradient of a 3x3, stride-1 convolution by the fastest of oneDNN's kernel and two GEMM
  formulations (im2col of all nine taps; three GEMMs over column-shifted rows), each timed on this
  machine at the first backward of each shape, as ``torch.backends.cudnn.benchmark`` does on CUDA.
  With ``torch.use_deterministic_algorithms`` (``--set deterministic=true``) no timing decides:
  oneDNN's kernel is used, so that a run is the same bit for bit from one process to the next;
- everything else with oneDNN.

The forward is ``F.conv2d`` in every case. Everywhere else (CUDA, autocast, inference, ONNX export,
``torch.compile``, tracing) a ``CpuConv2d`` is a plain ``nn.Conv2d``. The GEMM formulations equal
oneDNN's gradient up to the order of float32 sums (``tests/test_model_cpu_conv.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

THIN_INPUT = 4
"""Input channels up to which the weight gradient is always im2col + GEMM (oneDNN's kernel for a
one-channel input ran at 4-6 GFLOP/s on an AVX2 core, the GEMM path at 10-15)."""

_CHOICES: dict[tuple, str] = {}
"""Weight-gradient algorithm per (input shape and strides, weight shape) of a 3x3 stride-1
convolution, chosen by timing at its first backward (:func:`_autotuned`)."""


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


def _nhwc_padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous ``(B, H + 2, W + 2, C)`` tensor, zero-padded by one pixel."""
    return F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()


def _im2col_gemm(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, conf: tuple) -> torch.Tensor:
    """3x3, stride 1, padding 1: the nine taps of every pixel as one ``(B*H*W, 9*C)`` matrix, one GEMM."""
    b, c, h, w = x.shape
    out_ch = weight.shape[0]
    xp = _nhwc_padded(x)
    s = xp.stride()
    cols = xp.as_strided((b, h, w, 3, 3, c), (s[0], s[1], s[2], s[1], s[2], 1)).reshape(b * h * w, 9 * c)
    g = grad.permute(0, 2, 3, 1).reshape(-1, out_ch)
    return (g.t() @ cols).view(out_ch, 3, 3, c).permute(0, 3, 1, 2)


def _row_gemm(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, conf: tuple) -> torch.Tensor:
    """3x3, stride 1, padding 1: three GEMMs, one per kernel row ``i``, over a matrix of the three
    column-shifted copies of every padded row (3x the input instead of im2col's 9x).

    Row ``(b, y', x)`` of ``cols`` holds ``xp[b, y', x + j, :]`` for ``j = 0..2``; kernel row ``i`` pairs
    output row ``y`` with padded row ``y + i``, i.e. ``cols`` shifted by ``i * W`` rows, provided the
    gradient gets two zero rows below each image (the K dimension runs over ``B * (H + 2) * W``).
    """
    b, c, h, w = x.shape
    out_ch = weight.shape[0]
    xp = _nhwc_padded(x)
    s = xp.stride()
    cols = xp.as_strided((b, h + 2, w, 3, c), (s[0], s[1], s[2], s[2], 1)).reshape(b * (h + 2) * w, 3 * c)
    cols = torch.cat([cols, cols.new_zeros(2 * w, 3 * c)])
    k = b * (h + 2) * w
    g = F.pad(grad.permute(0, 2, 3, 1), (0, 0, 0, 0, 0, 2)).reshape(k, out_ch).t()
    out = torch.empty(out_ch, 3, 3 * c, dtype=x.dtype)
    for i in range(3):
        torch.mm(g, cols[i * w : i * w + k], out=out[:, i])
    return out.view(out_ch, 3, 3, c).permute(0, 3, 1, 2)


ALGORITHMS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple], torch.Tensor]] = {
    "onednn": _onednn,
    "im2col": _im2col_gemm,
    "rows": _row_gemm,
}
"""The weight-gradient algorithms a 3x3 stride-1 convolution chooses from (name -> function)."""


def _autotuned(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, conf: tuple) -> str:
    """The fastest algorithm for this shape on this machine: each timed three times, alternating
    (process time, as ``bench/``), the smallest median wins; decided once per shape and process."""
    key = (tuple(x.shape), x.stride(), tuple(grad.stride()), tuple(weight.shape), torch.get_num_threads())
    name = _CHOICES.get(key)
    if name is None:
        times: dict[str, list[float]] = {n: [] for n in ALGORITHMS}
        for _ in range(4):
            for n, fn in ALGORITHMS.items():
                t0 = time.process_time()
                fn(x, grad, weight, conf)
                times[n].append(time.process_time() - t0)
        name = min(times, key=lambda n: sorted(times[n][1:])[1])  # the first run of each is a warm-up
        _CHOICES[key] = name
    return name


def weight_gradient(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, conf: tuple) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, weight, None, *conf)`` for the output gradient ``grad`` (float32, CPU)."""
    stride, padding, dilation, groups = conf
    if groups == 1 and dilation == (1, 1) and x.shape[1] <= THIN_INPUT:
        gw = _unfold_gemm(x, grad, weight, conf)
    elif (
        groups == 1 and dilation == (1, 1) and stride == (1, 1) and padding == (1, 1) and weight.shape[2:] == (3, 3)
        and not torch.are_deterministic_algorithms_enabled()
    ):
        gw = ALGORITHMS[_autotuned(x, grad, weight, conf)](x, grad, weight, conf)
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
    float32 on a CPU; see the module docstring for how and where."""

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
