"""Full network: shapes, patch-grid resize, CRF identity at zero compatibility, ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrloc.config import make_config
from cxrloc.model.head import PatchHead
from cxrloc.model.net import CXRLocNet, build_model
from cxrloc.model.pac_crf import PacCrf
from cxrloc.thresholds import ThresholdBuffers


def _net(*overrides: str) -> CXRLocNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model(make_config("tiny", list(overrides)))


@pytest.mark.parametrize("crf", [False, True])
def test_forward_shapes_and_interface(crf: bool) -> None:
    net = _net(f"crf={crf}")
    z, u = net(torch.rand(2, 1, 64, 64) * 2 - 1)
    assert z.shape == u.shape == (2, 14, 8, 8)
    assert z.dtype == u.dtype == torch.float32
    assert float(z.min()) >= 0 and float(z.max()) <= 1
    assert isinstance(net.thresholds, ThresholdBuffers) and net.thresholds.patch_grid == 8
    assert "thresholds.tau" in net.state_dict()
    unary_ids = {id(p) for p in net.unary_parameters()}
    crf_ids = {id(p) for p in net.crf_parameters()}
    assert unary_ids and not unary_ids & crf_ids
    assert unary_ids | crf_ids == {id(p) for p in net.parameters()}
    assert (net.crf is None) != crf
    if not crf:
        assert torch.equal(z, torch.sigmoid(u))


def test_patch_grid_from_512_like_input() -> None:
    # 128 px -> 4 x 4 features at stride 32 -> bilinear to P = 5 (the paper's 512 -> 16 -> 20, scaled by 1/4).
    net = _net("image_size=128", "patch_grid=5", "crf_window=3")
    z, u = net(torch.zeros(1, 1, 128, 128))
    assert z.shape == (1, 14, 5, 5)
    head = net.unary.head
    feats = torch.randn(1, 3, 4, 4)
    small = PatchHead(3, 5, hidden=4).eval()
    with torch.no_grad():
        got = small(feats)
        # the head resizes like F.interpolate(bilinear, align_corners=False), then the two convs
        up = F.interpolate(feats, size=(5, 5), mode="bilinear", align_corners=False)
        ref = small.conv2(torch.relu(small.bn1(small.conv1(up))))
    assert torch.allclose(got, ref)
    assert head.patch_grid == 5
    # when the map already is P x P nothing is resized
    same = PatchHead(3, 4, hidden=4).eval()
    with torch.no_grad():
        assert torch.allclose(same(feats), same.conv2(torch.relu(same.bn1(same.conv1(feats)))))


def test_head_bias_prior() -> None:
    head = PatchHead(8, 20, hidden=4)
    assert torch.allclose(torch.sigmoid(head.conv2.bias), torch.full((14,), 1 / 400))


@pytest.mark.parametrize("train", [False, True])
def test_crf_with_zero_compatibility_is_exactly_the_unary(train: bool) -> None:
    net = _net("crf=true", "crf_iterations=3")
    net.train(train)
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    z, u = net(x)
    assert torch.equal(z, torch.sigmoid(u))  # bit-exact, in train and eval mode


def test_crf_messages_by_hand() -> None:
    """One mean-field step on a 3x3 grid, K = 2, checked against an explicit double loop."""
    gen = torch.Generator().manual_seed(3)
    crf = PacCrf(2, image_size=12, patch_grid=3, window=3, iterations=1, feature_dim=2, branch_channels=4).eval()
    with torch.no_grad():
        crf.compat.copy_(torch.randn(2, 2, 9, generator=gen))
    feats = torch.randn(1, 2, 3, 3, generator=gen)
    unary = torch.randn(1, 2, 3, 3, generator=gen)
    q = torch.sigmoid(unary)
    g = crf.kernel(feats)
    msg = crf.message(q, g).view(1, 2, 3, 3)
    ref = torch.zeros(2, 3, 3)
    for k in range(2):
        for r in range(3):
            for c in range(3):
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if (dr, dc) == (0, 0) or not (0 <= rr < 3 and 0 <= cc < 3):
                            continue
                        o = (dr + 1) * 3 + (dc + 1)
                        gauss = torch.exp(-0.5 * ((feats[0, :, r, c] - feats[0, :, rr, cc]) ** 2).sum())
                        for k2 in range(2):
                            ref[k, r, c] += gauss * crf.compat[k, k2, o] * q[0, k2, rr, cc]
    assert torch.allclose(msg[0], ref, atol=1e-5)


def test_crf_learns_nonzero_messages() -> None:
    net = _net("crf=true")
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    z, u = net(x)
    z.sum().backward()
    assert net.crf.compat.grad is not None and net.crf.compat.grad.abs().sum() > 0
    assert net.crf.refine[-1].weight.grad.abs().sum() > 0  # the zero-initialised BN can leave zero
    with torch.no_grad():
        net.crf.compat.fill_(0.5)  # positive compatibility: neighbours raise each other
    net.eval()
    z2, u2 = net(x)
    assert not torch.equal(z2, torch.sigmoid(u2))
    assert bool((z2 >= torch.sigmoid(u2) - 1e-6).all())


def test_onnx_export_runs_in_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    net = _net("crf=true")
    with torch.no_grad():
        net.crf.compat.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    net.eval()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    path = tmp_path / "net.onnx"
    # The TorchScript exporter (dynamo=False) is quick; the dynamo exporter also works (slower).
    torch.onnx.export(
        net, (x,), str(path), input_names=["image"], output_names=["z", "unary_logits"],
        dynamic_axes={"image": {0: "batch"}, "z": {0: "batch"}, "unary_logits": {0: "batch"}},
        dynamo=False, opset_version=17,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.rand(3, 1, 64, 64) * 2 - 1  # another batch size than the export
    z_ort, u_ort = sess.run(None, {"image": x3.numpy()})
    with torch.no_grad():
        z, u = net(x3)
    assert np.abs(z_ort - z.numpy()).max() < 1e-4
    assert np.abs(u_ort - u.numpy()).max() < 1e-3
