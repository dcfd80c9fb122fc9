"""ResNet backbones (torchvision layout) with one input channel, optional anti-aliasing and width.

``create_backbone`` returns the network up to ``layer4`` (no global pooling, no classifier)
and its number of output channels. Module and parameter names are torchvision's, so
torchvision ImageNet weights load directly (``conv1`` summed over RGB to one channel).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from cxrloc.config import OUTPUT_STRIDES
from cxrloc.model.blurpool import BlurConv2d, BlurPool2d
from cxrloc.utils import CxrlocError

_ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
}

_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
}

OUTPUT_STRIDE = 32
"""Total subsampling of the torchvision backbone (stem conv 2, max-pool 2, layers 2-4 one each)."""


class ResNetBackbone(nn.Module):
    """torchvision ResNet without ``avgpool``/``fc``, one input channel, stage widths scaled by ``width / 64``.

    Attribute names (``conv1``, ``bn1``, ``maxpool``, ``layer1``..``layer4``) match torchvision so
    its state dicts load. ``forward`` returns the feature map ``(B, out_channels, H/s, W/s)`` at
    output stride ``s`` (32: torchvision's; 16 or 8: the last one or two stages run at stride 1,
    without dilation, so that a small input keeps a finer map; parameter shapes are unchanged).
    """

    def __init__(self, arch: str, width: int = 64, output_stride: int = OUTPUT_STRIDE) -> None:
        super().__init__()
        if arch not in _ARCHS:
            raise CxrlocError(f"Unknown arch '{arch}': choose one of {', '.join(_ARCHS)}.")
        if width < 1:
            raise CxrlocError(f"Invalid width={width}: it must be a positive number of channels.")
        if output_stride not in OUTPUT_STRIDES:
            raise CxrlocError(f"Invalid output_stride={output_stride}: use 8, 16 or 32.")
        self.output_stride = output_stride
        block, layers = _ARCHS[arch]
        self.inplanes = width
        self.conv1 = nn.Conv2d(1, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2 if output_stride >= 16 else 1)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2 if output_stride >= 32 else 1)
        self.out_channels = 8 * width * block.expansion
        # torchvision's initialisation (kaiming fan-out for convs, BN = identity).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def make_antialiased(net: ResNetBackbone, blur_size: int = 3) -> None:
    """Insert blur-pools before every downsampling, in place (Zhang 2019, "ConvBlurPool").

    - stem max-pool(3, s2) -> max-pool(3, s1) + blur-pool(s2);
    - the strided 3x3 conv of a block runs at stride 1 and its output, after BN and ReLU, is
      blur-pooled (s2) before the block's next conv (BasicBlock: ``conv2``; Bottleneck: ``conv3``);
    - the strided 1x1 shortcut conv -> blur-pool(s2) then 1x1 conv at stride 1.

    The 7x7 stem conv keeps its stride 2, as in Zhang's released models (``pool_only=True``).
    Parameter names are unchanged (blurs hold non-persistent buffers only).
    """
    stem_channels = net.conv1.out_channels
    net.maxpool = nn.Sequential(
        nn.MaxPool2d(kernel_size=3, stride=1, padding=1), BlurPool2d(stem_channels, blur_size, stride=2)
    )
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for blk in layer:
            if isinstance(blk, tv_resnet.Bottleneck):
                strided, after = "conv2", "conv3"
            else:
                strided, after = "conv1", "conv2"
            conv = getattr(blk, strided)
            if conv.stride[0] == 1:
                continue
            stride = conv.stride[0]
            conv.stride = (1, 1)
            setattr(blk, after, BlurConv2d(getattr(blk, after), stride=stride, filt_size=blur_size))
            if blk.downsample is not None:
                blk.downsample[0] = BlurConv2d(
                    _restride(blk.downsample[0]), stride=stride, filt_size=blur_size
                )


def _restride(conv: nn.Conv2d) -> nn.Conv2d:
    conv.stride = (1, 1)
    return conv


def _adapt_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Drop the classifier, strip DDP prefixes and reduce an RGB ``conv1`` to one channel by summing."""
    if not isinstance(state, dict):
        raise CxrlocError(f"{source} does not hold a state dict (got {type(state).__name__}).")
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        name = name.removeprefix("module.").removeprefix("backbone.")
        if name.startswith("fc."):
            continue
        out[name] = value
    w = out.get("conv1.weight")
    if isinstance(w, torch.Tensor) and w.ndim == 4 and w.shape[1] == 3:
        # A grey image is an RGB image with three equal channels: the RGB filters sum to one filter.
        out["conv1.weight"] = w.sum(dim=1, keepdim=True)
    return out


def _load_weights(net: ResNetBackbone, state: dict[str, torch.Tensor], source: str) -> None:
    state = _adapt_state_dict(state, source)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"shape mismatch for {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise CxrlocError(
            f"Weights in {source} do not fit this backbone: {'; '.join(parts)}. "
            "Check that --set arch=... and width=64 match the file."
        )
    net.load_state_dict(state, strict=True)


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    from torchvision import models

    weights = getattr(models, _WEIGHTS[arch]).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # no network, proxy, corrupt cache ...
        raise CxrlocError(
            f"Cannot get torchvision's ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
            f"Download them elsewhere ({weights.url}) and pass the file with --set init=/path/{arch}.pth, "
            "or train from scratch with --set init=scratch."
        ) from None


def create_backbone(
    arch: str = "resnet50",
    width: int = 64,
    antialias: bool = True,
    blur_size: int = 3,
    init: str = "scratch",
    output_stride: int = OUTPUT_STRIDE,
) -> tuple[nn.Module, int]:
    """Build a one-channel ResNet feature extractor.

    Args:
        arch: ``resnet18``, ``resnet34`` or ``resnet50``.
        width: stem channels; stage widths are ``width * (1, 2, 4, 8)`` (64 = torchvision).
        antialias: insert blur-pools before each downsampling (see :func:`make_antialiased`).
        blur_size: binomial filter taps.
        init: ``scratch``, ``imagenet`` (torchvision's default weights; needs ``width == 64``)
            or a path to a state-dict file (``torch.load(weights_only=True)``; RGB ``conv1`` is summed).
        output_stride: 32 (torchvision), 16 or 8 (see :class:`ResNetBackbone`).

    Returns:
        ``(module, out_channels)``; the module maps ``(B, 1, H, W)`` to ``(B, C, ceil(H/s), ceil(W/s))``
        with ``s = output_stride``.

    Example:
        >>> net, c = create_backbone("resnet18", width=8, init="scratch")
        >>> c
        64
    """
    net = ResNetBackbone(arch, width, output_stride)
    if init == "imagenet":
        if width != 64:
            raise CxrlocError(f"init=imagenet needs width=64 (torchvision's), got width={width}. Use init=scratch.")
        _load_weights(net, _imagenet_state_dict(arch), f"torchvision's {arch} ImageNet weights")
    elif init != "scratch":
        path = Path(os.path.expanduser(init))
        if not path.is_file():
            raise CxrlocError(
                f"init={init!r} is neither 'scratch', 'imagenet' nor an existing weights file. "
                "Pass a state-dict file with --set init=/path/resnet50.pth or use --set init=scratch."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CxrlocError(f"Cannot read weights file {path}: {exc}. It must be a torch state dict.") from None
        _load_weights(net, state, str(path))
    # Anti-aliasing is applied after loading: it keeps every parameter and only adds fixed filters.
    if antialias:
        make_antialiased(net, blur_size)
    return net, net.out_channels
