"""Losses against values worked out by hand on tiny patch grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxrloc.config import make_config
from cxrloc.thresholds import ThresholdBuffers
from cxrloc.training.losses import compute_gamma, compute_loss, log_prob_any
from cxrloc.utils import CxrlocError

K = 14


def _thresholds(p: int, tau: float, rho: float, tau_hat: float, rho_hat: float) -> ThresholdBuffers:
    tb = ThresholdBuffers(p)
    tb.tau.fill_(tau)
    tb.rho.fill_(rho)
    tb.tau_hat.fill_(tau_hat)
    tb.rho_hat.fill_(rho_hat)
    return tb


def _batch(b: int, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything zero: z, labels, annotated, box_mask."""
    return (
        torch.zeros(b, K, p, p),
        torch.zeros(b, K),
        torch.zeros(b, K, dtype=torch.bool),
        torch.zeros(b, K, p, p),
    )


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# ---------------------------------------------------------------- threshold (eq. 12)


@pytest.mark.parametrize(
    ("covered", "expected"),
    [
        # 3x3 grid, box = the 2x2 top-left patches (|b| = 4, |bbar| = 5), tau = 0.7, rho = 0.05, lambda = 70.
        ("full", 0.0),  # z = 1 on the box only: 4 >= 0.7*4, 0 <= 0.05*5
        ("half", 70 * (0.7 * 4 - 2) / 4),  # two of the four box patches: 70 * 0.2 = 14
        ("empty", 70 * 0.7),  # nothing detected: 70 * (2.8 - 0) / 4 = 49
        ("all", 70 * (5 - 0.05 * 5) / 5),  # everything: box fine, outside 5 > 0.25 -> 70 * 0.95 = 66.5
    ],
)
def test_threshold_annotated_box(covered: str, expected: float) -> None:
    cfg = make_config("tiny", ["loss=threshold", "patch_grid=3"])
    z, labels, ann, mask = _batch(1, 3)
    k = 4
    mask[0, k, :2, :2] = 1
    ann[0, k] = True
    labels[0, k] = 1
    if covered == "full":
        z[0, k, :2, :2] = 1
    elif covered == "half":
        z[0, k, 0, :2] = 1
    elif covered == "all":
        z[0, k] = 1
    tb = _thresholds(3, tau=0.7, rho=0.05, tau_hat=2.0, rho_hat=1.0)
    loss, terms = compute_loss(cfg, z, torch.zeros_like(z), labels, ann, mask, tb, torch.ones(K))
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert terms["ann"].item() == pytest.approx(expected, abs=1e-5)
    assert terms["un_pos"].item() == 0 and terms["un_neg"].item() == 0


def test_threshold_partial_values_and_box_covering_grid() -> None:
    cfg = make_config("tiny", ["loss=threshold", "patch_grid=2", "lambda_ann=1"])
    z, labels, ann, mask = _batch(1, 2)
    # class 0: box = top row; z = [[0.9, 0.8], [0.3, 0.0]], tau 0.9, rho 0.1:
    # ReLU(1.8 - 1.7)/2 + ReLU(0.3 - 0.2)/2 = 0.05 + 0.05
    z[0, 0] = torch.tensor([[0.9, 0.8], [0.3, 0.0]])
    mask[0, 0, 0, :] = 1
    ann[0, 0] = True
    # class 1: box covers the whole grid (bbar empty -> no outside term); z sums to 2: ReLU(3.6 - 2)/4 = 0.4
    z[0, 1] = 0.5
    mask[0, 1] = 1
    ann[0, 1] = True
    tb = _thresholds(2, tau=0.9, rho=0.1, tau_hat=1.0, rho_hat=1.0)
    loss, _ = compute_loss(cfg, z, z, labels, ann, mask, tb, torch.ones(K))
    assert loss.item() == pytest.approx(0.1 + 0.4, abs=1e-6)


def test_threshold_unannotated_gamma_and_batch_mean() -> None:
    cfg = make_config("tiny", ["loss=threshold", "patch_grid=3"])
    z, labels, ann, mask = _batch(2, 3)
    # image 0, class 2 positive, 1'z = 1.5 < tau_hat = 2 -> 0.5
    z[0, 2, 0, :3] = 0.5
    labels[0, 2] = 1
    # image 0, class 3 negative, 1'z = 3 > rho_hat = 1 -> gamma_3 * 2
    z[0, 3, 1, :] = 1.0
    # image 1, class 5 positive with enough patches (1'z = 4 >= 2) -> 0; class 6 negative, 1'z = 0.5 -> 0
    z[1, 5, :2, :2] = 1.0
    labels[1, 5] = 1
    z[1, 6, 0, 0] = 0.5
    gamma = torch.ones(K)
    gamma[3] = 0.25
    tb = _thresholds(3, tau=0.7, rho=0.05, tau_hat=2.0, rho_hat=1.0)
    loss, terms = compute_loss(cfg, z, z, labels, ann, mask, tb, gamma)
    # mean over the 2 images: (0.5 + 0.25 * 2 + 0) / 2
    assert terms["un_pos"].item() == pytest.approx(0.5 / 2)
    assert terms["un_neg"].item() == pytest.approx(0.5 / 2)
    assert loss.item() == pytest.approx(0.5)
    gamma[3] = 0.5  # doubling gamma doubles the negative term only
    loss2, terms2 = compute_loss(cfg, z, z, labels, ann, mask, tb, gamma)
    assert terms2["un_neg"].item() == pytest.approx(2 * terms["un_neg"].item())
    assert terms2["un_pos"].item() == pytest.approx(terms["un_pos"].item())


def test_annotated_class_ignores_unannotated_terms() -> None:
    # a_k = 1 switches the unannotated term of class k off (and lambda_ann applies).
    cfg = make_config("tiny", ["loss=threshold", "patch_grid=2", "lambda_ann=10"])
    z, labels, ann, mask = _batch(1, 2)
    z[0, 0] = 1.0  # box = everything, fully detected -> L_ann = 0; unannotated would give ReLU(4 - 1) > 0
    mask[0, 0] = 1
    ann[0, 0] = True
    tb = _thresholds(2, tau=0.5, rho=0.1, tau_hat=1.0, rho_hat=1.0)
    loss, _ = compute_loss(cfg, z, z, labels, ann, mask, tb, torch.ones(K))
    assert loss.item() == 0.0
    ann[0, 0] = False  # now it is an unannotated negative: ReLU(4 - 1) = 3
    loss, _ = compute_loss(cfg, z, z, labels, ann, mask, tb, torch.ones(K))
    assert loss.item() == pytest.approx(3.0)


def test_image_bce_by_hand() -> None:
    # tau_hat = 2, rho_hat = 6 -> logit (1'z - 4) / 2; K classes, one image.
    z, labels, ann, mask = _batch(1, 3)
    z[0, 0, 0, :] = 1.0  # class 0 positive, 1'z = 3 (>= tau_hat: eq. 12 gives 0) -> softplus(0.5)
    labels[0, 0] = 1
    z[0, 1, :2, :] = 1.0  # class 1 negative, 1'z = 6 (<= rho_hat: eq. 12 gives 0) -> gamma softplus(1)
    z[0, 2] = 1.0  # class 2 boxed (a = 1): no image-level term
    labels[0, 2] = 1
    ann[0, 2] = True
    mask[0, 2] = 1.0
    gamma = torch.full((K,), 0.5)
    tb = _thresholds(3, tau=0.7, rho=0.05, tau_hat=2.0, rho_hat=6.0)
    plain = make_config("tiny", ["loss=threshold", "patch_grid=3"])
    _, t0 = compute_loss(plain, z, z, labels, ann, mask, tb, gamma)
    assert t0["un_pos"].item() == 0.0 and t0["un_neg"].item() == 0.0  # the dead zone of eq. 12
    cfg = make_config("tiny", ["loss=threshold", "patch_grid=3", "image_bce=2"])
    _, t1 = compute_loss(cfg, z, z, labels, ann, mask, tb, gamma)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    # class 0: softplus(-(3 - 4) / 2); the other 11 negatives (classes 3..13) have 1'z = 0: softplus(-2)
    assert t1["un_pos"].item() == pytest.approx(2 * softplus(0.5), rel=1e-6)
    expected_neg = 2 * 0.5 * (softplus(1.0) + 11 * softplus(-2.0))
    assert t1["un_neg"].item() == pytest.approx(expected_neg, rel=1e-6)
    with pytest.raises(CxrlocError, match="image_bce"):
        make_config("tiny", ["image_bce=-1"])


# ---------------------------------------------------------------- threshold-sigmoid (eqs. 5 and 8)


def test_threshold_sigmoid_by_hand() -> None:
    t = 0.5
    cfg = make_config("tiny", ["loss=threshold-sigmoid", "patch_grid=2", "lambda_ann=2", f"sigmoid_temperature={t}"])
    z, labels, ann, mask = _batch(1, 2)
    z[0, 0] = torch.tensor([[0.9, 0.8], [0.3, 0.0]])
    mask[0, 0, 0, :] = 1
    ann[0, 0] = True
    z[0, 1] = torch.tensor([[0.5, 0.5], [0.25, 0.0]])  # 1'z = 1.25
    labels[0, 1] = 1
    z[0, 2] = torch.tensor([[1.0, 0.5], [0.0, 0.0]])  # 1'z = 1.5, negative
    gamma = torch.ones(K)
    gamma[2] = 0.5
    tb = _thresholds(2, tau=0.9, rho=0.1, tau_hat=1.0, rho_hat=0.5)
    loss, terms = compute_loss(cfg, z, z, labels, ann, mask, tb, gamma)
    ann_ref = -2 * _sigmoid((1.7 - 1.8) / t) * _sigmoid((0.2 - 0.3) / t)
    pos_ref = -_sigmoid((1.25 - 1.0) / t)
    # every other (unannotated, negative, z = 0) class contributes -gamma * s((0.5 - 0) / t)
    neg_ref = -0.5 * _sigmoid((0.5 - 1.5) / t) - 11 * _sigmoid(0.5 / t)
    assert terms["ann"].item() == pytest.approx(ann_ref, rel=1e-5)
    assert terms["un_pos"].item() == pytest.approx(pos_ref, rel=1e-5)
    assert terms["un_neg"].item() == pytest.approx(neg_ref, rel=1e-5)
    assert loss.item() == pytest.approx(ann_ref + pos_ref + neg_ref, rel=1e-5)


# ---------------------------------------------------------------- li2018


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_li2018_by_hand() -> None:
    cfg = make_config("tiny", ["loss=li2018", "patch_grid=2", "lambda_ann=3", "crf=false"])
    probs = [[0.8, 0.5], [0.2, 0.5]]
    _, labels, ann, mask = _batch(3, 2)
    logits = torch.full((3, K, 2, 2), -1e4)  # other classes: certainly absent, labels 0 -> loss 0
    for i in range(3):
        logits[i, 0] = torch.tensor([[_logit(v) for v in row] for row in probs])
    mask[0, 0, 0, :] = 1
    ann[0, 0] = True  # image 0: annotated, box = top row
    labels[1, 0] = 1  # image 1: unannotated positive; image 2: unannotated negative
    tb = ThresholdBuffers(2)
    loss, terms = compute_loss(cfg, torch.sigmoid(logits), logits, labels, ann, mask, tb, torch.ones(K))
    flat = [0.8, 0.5, 0.2, 0.5]
    l_ann = -(math.log(0.8) + math.log(0.5) + math.log(1 - 0.2) + math.log(1 - 0.5))
    none = math.prod(1 - v for v in flat)
    l_pos = -math.log(1 - none)
    l_neg = -math.log(none)
    assert terms["ann"].item() == pytest.approx(3 * l_ann / 3, rel=1e-5)
    assert terms["un_pos"].item() == pytest.approx(l_pos / 3, rel=1e-5)
    assert terms["un_neg"].item() == pytest.approx(l_neg / 3, rel=1e-5)
    assert loss.item() == pytest.approx((3 * l_ann + l_pos + l_neg) / 3, rel=1e-5)

    # Li et al.'s squeeze: every factor f of the products becomes 0.98 + 0.02 f.
    cfg_r = make_config("tiny", ["loss=li2018", "patch_grid=2", "lambda_ann=3", "crf=false", "li2018_rescale=true"])
    loss_r, terms_r = compute_loss(
        cfg_r, torch.sigmoid(logits), logits, labels, ann, mask, ThresholdBuffers(2), torch.ones(K)
    )

    def sq(f: float) -> float:
        return 0.98 + 0.02 * f

    l_ann_r = -(math.log(sq(0.8)) + math.log(sq(0.5)) + math.log(sq(0.8)) + math.log(sq(0.5)))
    none_r = math.prod(sq(1 - v) for v in flat)
    # the 13 other classes are squeezed too: each of their factors (1 - p) = 1 stays sq(1) = 1 -> no loss
    assert terms_r["ann"].item() == pytest.approx(l_ann_r, rel=1e-4)
    assert terms_r["un_pos"].item() == pytest.approx(-math.log(1 - none_r) / 3, rel=1e-4)
    assert terms_r["un_neg"].item() == pytest.approx(-math.log(none_r) / 3, rel=1e-4)


def test_li2018_with_crf_reads_z() -> None:
    cfg = make_config("tiny", ["loss=li2018", "patch_grid=2", "crf=true"])
    z = torch.zeros(1, K, 2, 2)
    z[0, 0] = torch.tensor([[0.9, 0.1], [0.1, 0.1]])
    labels = torch.zeros(1, K)
    labels[0, 0] = 1
    unary = torch.zeros(1, K, 2, 2)  # p = 0.5: a different answer if the loss read it
    loss, _ = compute_loss(
        cfg, z, unary, labels, torch.zeros(1, K, dtype=torch.bool), torch.zeros(1, K, 2, 2), ThresholdBuffers(2),
        torch.ones(K),
    )
    # class 0: -log(1 - 0.1 * 0.9^3); the other 13 classes have z = 0, clamped to 1e-6: -4 log(1 - 1e-6) each
    expected = -math.log(1 - 0.1 * 0.9**3) - 13 * 4 * math.log(1 - 1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_li2018_stable_where_naive_product_underflows() -> None:
    cfg = make_config("tiny", ["loss=li2018", "patch_grid=20", "crf=false", "lambda_ann=1"])
    p = 20
    gen = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(4, K, p, p, generator=gen) > 0.5, 1.0, -1.0)
    sign[0] = 1.0  # image 0: all +50
    sign[1] = -1.0  # image 1: all -50
    logits = (50.0 * sign).requires_grad_(True)
    labels = torch.zeros(4, K)
    labels[1] = 1  # all -50 but labelled positive: -log(1 - (1 - s(-50))^400)
    labels[2, :7] = 1
    ann = torch.zeros(4, K, dtype=torch.bool)
    mask = torch.zeros(4, K, p, p)
    ann[3, :5] = True
    mask[3, :5, :10, :] = 1  # half-grid boxes under random +/-50 logits
    tb = ThresholdBuffers(p)
    loss, terms = compute_loss(cfg, torch.sigmoid(logits), logits, labels, ann, mask, tb, torch.ones(K))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # image 0 (all +50, negative): -sum log(1 - p) = 400 * 50 per class; image 1: -log(400 e^-50) per class
    per_class_pos = -(math.log(400) - 50.0)
    l0 = K * 400 * (50 + math.log1p(math.exp(-50)))
    l1 = K * per_class_pos
    img0, _ = compute_loss(cfg, torch.sigmoid(logits[:1]), logits[:1], labels[:1], ann[:1], mask[:1],
                           ThresholdBuffers(p), torch.ones(K))
    img1, _ = compute_loss(cfg, torch.sigmoid(logits[1:2]), logits[1:2], labels[1:2], ann[1:2], mask[1:2],
                           ThresholdBuffers(p), torch.ones(K))
    assert img0.item() == pytest.approx(l0, rel=1e-5)
    assert img1.item() == pytest.approx(l1, rel=1e-4)

    # The naive product of Li et al.'s equations, in the same float32, breaks on the same inputs.
    with torch.no_grad():
        probs = torch.sigmoid(logits)
        none = torch.prod((1 - probs).flatten(-2), dim=-1)  # (B, K)
        naive_un = -(labels * torch.log(1 - none) + (1 - labels) * torch.log(none))
        box_prod = torch.prod(torch.where(mask > 0, probs, 1 - probs).flatten(-2), dim=-1)
        naive_ann = -torch.log(box_prod)
    assert not torch.isfinite(naive_un[0]).all()  # prod of zeros: log(0)
    assert not torch.isfinite(naive_un[1]).all()  # prod of ones: 1 - 1 = 0
    assert not torch.isfinite(naive_ann[3, :5]).all()


def test_log_prob_any_extreme_logits() -> None:
    for v in (-300.0, -50.0, -15.5, -3.0, 0.0, 2.0):
        logits = torch.full((1, 1, 20, 20), v, requires_grad=True)
        out = log_prob_any(logits)
        out.sum().backward()
        if v < -30:
            ref = v + math.log(400)  # 1 - (1 - e^v)^400 ~ 400 e^v
        else:
            ref = math.log(-math.expm1(-400 * math.log1p(math.exp(v))))
        assert out.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert torch.isfinite(logits.grad).all()
        if v < -30:  # d/dl_j log(sum e^l) = 1/400 each
            assert logits.grad.mean().item() == pytest.approx(1 / 400, rel=1e-4)


# ---------------------------------------------------------------- gamma


def test_compute_gamma() -> None:
    labels = np.zeros((10, K))
    labels[:2, 0] = 1  # 2 positives, 8 negatives -> 0.25
    labels[:5, 1] = 1  # 5 / 5 -> 1
    labels[:, 2] = 1  # no negative -> fallback 1
    g = compute_gamma(labels, "per-class")
    assert g[0] == pytest.approx(0.25)
    assert g[1] == pytest.approx(1.0)
    assert g[2] == 1.0
    assert g[3] == 1.0  # no positive -> fallback 1
    total_pos = 2 + 5 + 10
    assert compute_gamma(labels, "global") == pytest.approx(np.full(K, total_pos / (10 * K - total_pos)))
    assert (compute_gamma(labels, "none") == 1).all()
    with pytest.raises(CxrlocError):
        compute_gamma(labels, "bogus")
    with pytest.raises(CxrlocError):
        compute_gamma(labels[:, :, None], "none")
