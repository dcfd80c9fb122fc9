"""Backbone shapes, output stride, widths and weight initialisation from a local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from cxrloc.model.backbone import OUTPUT_STRIDE, create_backbone
from cxrloc.model.blurpool import BlurConv2d, BlurPool2d
from cxrloc.utils import CxrlocError


@pytest.mark.parametrize(("arch", "expansion"), [("resnet18", 1), ("resnet34", 1), ("resnet50", 4)])
@pytest.mark.parametrize("antialias", [False, True])
def test_output_stride_and_channels(arch: str, expansion: int, antialias: bool) -> None:
    net, c = create_backbone(arch, width=4, antialias=antialias, init="scratch")
    assert c == 8 * 4 * expansion
    out = net(torch.randn(1, 1, 64, 96))
    assert out.shape == (1, c, 64 // OUTPUT_STRIDE, 96 // OUTPUT_STRIDE)
    assert OUTPUT_STRIDE == 32
    out = net(torch.randn(1, 1, 80, 80))  # not a multiple of 32: ceil at every stride-2 step
    assert out.shape[-2:] == (3, 3)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("antialias", [False, True])
def test_smaller_output_stride_keeps_parameters(arch: str, antialias: bool) -> None:
    ref, _ = create_backbone(arch, width=4, antialias=antialias, init="scratch")
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    for stride, side in ((16, 8), (8, 16)):
        net, _ = create_backbone(arch, width=4, antialias=antialias, init="scratch", output_stride=stride)
        assert {k: v.shape for k, v in net.state_dict().items()} == shapes  # ImageNet weights still load
        assert net(torch.randn(1, 1, 128, 128)).shape[-2:] == (side, side)
        blurs = [m for m in net.modules() if isinstance(m, BlurPool2d)]
        # stem + (main path + shortcut) for each stage that still downsamples
        assert len(blurs) == (1 + 2 * (2 if stride == 16 else 1) if antialias else 0)
    with pytest.raises(CxrlocError, match="output_stride"):
        create_backbone(arch, width=4, init="scratch", output_stride=4)


def test_antialias_layout_resnet50() -> None:
    net, _ = create_backbone("resnet50", width=4, antialias=True, blur_size=5, init="scratch")
    blurs = [m for m in net.modules() if isinstance(m, BlurPool2d)]
    # stem + 3 strided stages x (main path + shortcut)
    assert len(blurs) == 1 + 3 * 2
    assert all(b.filt_size == 5 for b in blurs)
    strided = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and not isinstance(m, BlurConv2d)
               and m.stride != (1, 1)]
    assert [m.kernel_size for m in strided] == [(7, 7)]  # only the stem conv still strides (Zhang's pool_only)
    assert isinstance(net.layer2[0].conv3, BlurConv2d) and net.layer2[0].conv2.stride == (1, 1)
    assert isinstance(net.layer2[0].downsample[0], BlurConv2d)


def test_same_parameter_names_as_torchvision() -> None:
    ours, _ = create_backbone("resnet18", width=64, antialias=True, init="scratch")
    tv = resnet18()
    tv_keys = {k for k in tv.state_dict() if not k.startswith("fc.")}
    assert set(ours.state_dict()) == tv_keys


def test_init_from_local_torchvision_file(tmp_path: Path) -> None:
    # A torchvision resnet18 state dict (random, no network) stands in for ImageNet weights.
    tv = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    net, _ = create_backbone("resnet18", width=64, antialias=True, init=str(path))
    sd = net.state_dict()
    # RGB filters summed to one grey filter: a grey image gives the same conv1 response as its RGB copy.
    assert torch.allclose(sd["conv1.weight"], tv.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(sd["layer3.0.conv2.weight"], tv.layer3[0].conv2.weight)
    assert torch.equal(sd["layer2.0.downsample.0.weight"], tv.layer2[0].downsample[0].weight)
    # Without anti-aliasing the network IS torchvision's (on a grey image replicated to RGB).
    plain, _ = create_backbone("resnet18", width=64, antialias=False, init=str(path))
    plain.eval()
    tv.eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x.repeat(1, 3, 1, 1)))))))))
        assert torch.allclose(plain(x), ref, atol=1e-4)


def test_init_errors(tmp_path: Path) -> None:
    with pytest.raises(CxrlocError, match="init=scratch"):
        create_backbone("resnet18", width=64, init=str(tmp_path / "missing.pth"))
    with pytest.raises(CxrlocError, match="width=64"):
        create_backbone("resnet18", width=8, init="imagenet")
    bad = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), bad)
    with pytest.raises(CxrlocError, match="do not fit"):
        create_backbone("resnet50", width=64, init=str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CxrlocError, match="Cannot read weights"):
        create_backbone("resnet18", width=64, init=str(junk))
    with pytest.raises(CxrlocError, match="Unknown arch"):
        create_backbone("vgg16", width=8)


def test_imagenet_unavailable_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import ResNet18_Weights

    def offline(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise OSError("no network")

    monkeypatch.setattr(type(ResNet18_Weights.DEFAULT), "get_state_dict", offline)
    with pytest.raises(CxrlocError, match=r"--set init=/path/resnet18\.pth.*init=scratch"):
        create_backbone("resnet18", width=64, init="imagenet")
