"""Training losses: Li et al. 2018 (``li2018``, in log space) and the threshold losses of
Rozenberg et al. 2019 (``threshold``: eq. 12, ReLU form; ``threshold-sigmoid``: eqs. 5 and 8).

Shapes: ``z``, ``unary_logits``, ``box_mask``: ``(B, K, P, P)``; ``labels``, ``annotated``: ``(B, K)``.
Per image the loss is ``sum_k [a_k * lambda_ann * L_ann(k) + (1 - a_k) * L_un(k)]``; the batch
loss is its mean over images. Everything is computed in float32, whatever the autocast dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cxrloc.config import Config
from cxrloc.thresholds import ThresholdBuffers
from cxrloc.utils import CxrlocError

LI2018_RESCALE_LOW: float = 0.98
"""Li et al.'s heuristic maps every factor f of their products to 0.98 + 0.02 f."""

Z_CLAMP_EPS: float = 1e-6
"""With a CRF, li2018 reads z, clamped to [eps, 1 - eps] and turned back into logits."""

_TINY = float(torch.finfo(torch.float32).tiny)
_LN2 = math.log(2.0)


def log1mexp(s: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(s))`` for ``s <= 0``, stable at both ends (Maechler 2012).

    ``log(-expm1(s))`` above ``-ln 2`` and ``log1p(-exp(s))`` below; each branch reads an input
    clamped to its own range, so the branch that ``where`` discards never makes a NaN gradient.
    ``s`` is capped at ``-tiny``: ``s = 0`` gives ``log(tiny) ~ -87`` instead of ``-inf``.
    """
    near = s.clamp(min=-_LN2, max=-_TINY)
    far = s.clamp(max=-_LN2)
    return torch.where(s > -_LN2, torch.log(-torch.expm1(near)), torch.log1p(-torch.exp(far)))


_SOFTPLUS_LINEAR_BELOW = -15.0
"""Below this logit, log(softplus(l)) = l to float32 precision (the correction is ~exp(l)/2)."""

_SMALL_COUNT = 1e-4
"""Below this x = sum_j softplus(l_j), log(1 - exp(-x)) is taken as log(x) - x/2 (error ~x^2/24)."""


def log_prob_any(logits: torch.Tensor) -> torch.Tensor:
    """``log(1 - prod_j (1 - sigmoid(l_j)))`` over the last two dims, exact and finite for any logits.

    With ``x = -sum_j log(1 - p_j) = sum_j softplus(l_j)`` the result is ``log(1 - exp(-x))``. When
    every patch is confidently negative, ``x`` underflows (logits of -200 give ``x = 0`` in float32),
    so ``log x`` is taken as a log-sum-exp of ``log softplus(l_j)``, which stays ~``max_j l_j``, and
    ``log(1 - exp(-x)) = log x + log((1 - exp(-x)) / x)``.
    """
    low = logits < _SOFTPLUS_LINEAR_BELOW
    safe = logits.clamp(min=_SOFTPLUS_LINEAR_BELOW)
    log_sp = torch.where(low, logits, torch.log(F.softplus(safe)))
    log_x = torch.logsumexp(log_sp.flatten(-2), dim=-1)
    x = torch.exp(log_x)
    small = x < _SMALL_COUNT
    big = log1mexp(-x.clamp(min=_SMALL_COUNT))
    return torch.where(small, log_x - 0.5 * x.clamp(max=_SMALL_COUNT), big)


def _log_factors(logits: torch.Tensor, rescale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, log(1 - p))`` per patch, optionally with Li et al.'s [0.98, 1] squeeze of each factor."""
    if not rescale:
        return F.logsigmoid(logits), F.logsigmoid(-logits)
    hi = 1.0 - LI2018_RESCALE_LOW
    return (
        torch.log(LI2018_RESCALE_LOW + hi * torch.sigmoid(logits)),
        torch.log(LI2018_RESCALE_LOW + hi * torch.sigmoid(-logits)),
    )


def li2018_terms(
    logits: torch.Tensor, labels: torch.Tensor, box_mask: torch.Tensor, rescale: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image, per-class terms of Li et al.'s loss, all ``(B, K)``.

    Returns:
        ``(L_ann, L_un_pos, L_un_neg)`` with
        ``L_ann = -(sum_{j in b} log p_j + sum_{j not in b} log(1 - p_j))``,
        ``L_un_pos = -y log(1 - prod_j (1 - p_j))`` and ``L_un_neg = -(1 - y) sum_j log(1 - p_j)``.
    """
    log_p, log_q = _log_factors(logits, rescale)
    m = box_mask
    l_ann = -((m * log_p).sum(dim=(-2, -1)) + ((1.0 - m) * log_q).sum(dim=(-2, -1)))
    s = log_q.sum(dim=(-2, -1))  # log(1 - p(y=1|x)) = sum_j log(1 - p_j)
    # log p(y=1|x): exact log-space form by default; with the squeeze s >= P^2 log 0.98 never underflows.
    log_any = log1mexp(s) if rescale else log_prob_any(logits)
    l_pos = -labels * log_any
    l_neg = -(1.0 - labels) * s
    return l_ann, l_pos, l_neg


def threshold_terms(
    z: torch.Tensor,
    labels: torch.Tensor,
    box_mask: torch.Tensor,
    thresholds: ThresholdBuffers,
    gamma: torch.Tensor,
    sigmoid_temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image, per-class terms of eq. 12 (ReLU form) or, with a temperature, eqs. 5 and 8.

    ReLU form (``sigmoid_temperature=None``):
        ``L_ann = ReLU(tau |b| - sum_b z) / |b| + ReLU(sum_bbar z - rho |bbar|) / |bbar|``
        (a term whose set is empty is 0), ``L_un_pos = y ReLU(tau_hat - 1'z)``,
        ``L_un_neg = gamma (1 - y) ReLU(1'z - rho_hat)``.
    Sigmoid form with temperature T:
        ``L_ann = -s((sum_b z - tau |b|) / T) s((rho |bbar| - sum_bbar z) / T)``,
        ``L_un_pos = -y s((1'z - tau_hat) / T)``, ``L_un_neg = -gamma (1 - y) s((rho_hat - 1'z) / T)``.

    Returns:
        ``(L_ann, L_un_pos, L_un_neg)``, each ``(B, K)``, without ``lambda_ann``.
    """
    m = box_mask
    n_in = m.sum(dim=(-2, -1))
    n_all = float(m.shape[-1] * m.shape[-2])
    n_out = n_all - n_in
    s_in = (z * m).sum(dim=(-2, -1))
    s_all = z.sum(dim=(-2, -1))
    s_out = s_all - s_in
    tau, rho = thresholds.tau.float(), thresholds.rho.float()
    tau_hat, rho_hat = thresholds.tau_hat.float(), thresholds.rho_hat.float()
    gamma = gamma.to(z.device, torch.float32)
    if sigmoid_temperature is None:
        a_in = torch.where(n_in > 0, F.relu(tau * n_in - s_in) / n_in.clamp(min=1.0), torch.zeros_like(s_in))
        a_out = torch.where(n_out > 0, F.relu(s_out - rho * n_out) / n_out.clamp(min=1.0), torch.zeros_like(s_out))
        l_ann = a_in + a_out
        l_pos = labels * F.relu(tau_hat - s_all)
        l_neg = gamma * (1.0 - labels) * F.relu(s_all - rho_hat)
    else:
        t = float(sigmoid_temperature)
        l_ann = -torch.sigmoid((s_in - tau * n_in) / t) * torch.sigmoid((rho * n_out - s_out) / t)
        l_pos = -labels * torch.sigmoid((s_all - tau_hat) / t)
        l_neg = -gamma * (1.0 - labels) * torch.sigmoid((rho_hat - s_all) / t)
    return l_ann, l_pos, l_neg


IMAGE_BCE_MIN_SCALE: float = 1.0
"""Smallest scale ``s_k`` (patches) of the image-score BCE's logit (:func:`image_score_bce_terms`)."""


def image_score_bce_terms(
    z: torch.Tensor, labels: torch.Tensor, thresholds: ThresholdBuffers, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-class BCE on the image score ``1'z`` (``image_bce``; not in the paper).

    The logit of class k is ``(1'z - m_k) / s_k`` with ``m_k = (tau_hat_k + rho_hat_k) / 2`` and
    ``s_k = max(|rho_hat_k - tau_hat_k| / 2, 1)`` patches: a fixed monotone map of the score the
    method already decides with, so no parameter is added. Unlike the ReLU terms of eq. 12, which are
    flat between ``tau_hat`` and ``rho_hat`` (with ``rho_hat >= tau_hat``, as in the ``cpu`` preset,
    positives and negatives can show the same region at no cost), the log-loss never goes flat on
    the wrong side: every positive is pushed above every negative.

    Returns:
        ``(pos, neg)``, each ``(B, K)``: ``y softplus(-l)`` and ``gamma (1 - y) softplus(l)``.
    """
    tau_hat, rho_hat = thresholds.tau_hat.float(), thresholds.rho_hat.float()
    mid = (tau_hat + rho_hat) / 2.0
    scale = ((rho_hat - tau_hat).abs() / 2.0).clamp(min=IMAGE_BCE_MIN_SCALE)
    logit = (z.sum(dim=(-2, -1)) - mid) / scale
    gamma = gamma.to(z.device, torch.float32)
    return labels * F.softplus(-logit), gamma * (1.0 - labels) * F.softplus(logit)


def compute_loss(
    cfg: Config,
    z: torch.Tensor,
    unary_logits: torch.Tensor,
    labels: torch.Tensor,
    annotated: torch.Tensor,
    box_mask: torch.Tensor,
    thresholds: ThresholdBuffers,
    gamma: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss selected by ``cfg.loss``.

    Args:
        cfg: uses ``loss``, ``lambda_ann``, ``crf``, ``sigmoid_temperature``, ``li2018_rescale``,
            ``image_bce`` (its terms are added to ``un_pos`` and ``un_neg``).
        z: CRF output probabilities ``(B, K, P, P)``.
        unary_logits: base model logits ``(B, K, P, P)``.
        labels: image labels ``(B, K)`` in {0, 1}.
        annotated: ``(B, K)`` bool, True where a box of class k is given (a_k).
        box_mask: ``(B, K, P, P)`` in {0, 1}, the patches of b_k (zeros where not annotated).
        thresholds: tau, rho, tau_hat, rho_hat (used by the threshold losses).
        gamma: ``(K,)`` weight of negative unannotated terms (threshold losses only).

    Returns:
        ``(loss, terms)``: the scalar mean over images of the per-image loss, and detached batch
        means of ``ann`` (with lambda_ann), ``un_pos`` and ``un_neg``; they sum to ``loss``.
    """
    labels = labels.float()
    a = annotated.float()
    mask = box_mask.float()
    if cfg.loss == "li2018":
        if cfg.crf:
            # The CRF outputs probabilities only: go back to logits, clamped so log(z), log(1-z) stay finite.
            logits = torch.logit(z.float().clamp(Z_CLAMP_EPS, 1.0 - Z_CLAMP_EPS))
        else:
            logits = unary_logits.float()
        l_ann, l_pos, l_neg = li2018_terms(logits, labels, mask, cfg.li2018_rescale)
    elif cfg.loss in ("threshold", "threshold-sigmoid"):
        temp = cfg.sigmoid_temperature if cfg.loss == "threshold-sigmoid" else None
        if temp is not None and temp <= 0:
            raise CxrlocError(f"sigmoid_temperature must be > 0, got {temp}.")
        l_ann, l_pos, l_neg = threshold_terms(z.float(), labels, mask, thresholds, gamma, temp)
    else:
        raise CxrlocError(f"Unknown loss '{cfg.loss}': use threshold, threshold-sigmoid or li2018.")
    if cfg.image_bce > 0:
        b_pos, b_neg = image_score_bce_terms(z.float(), labels, thresholds, gamma)
        l_pos = l_pos + cfg.image_bce * b_pos
        l_neg = l_neg + cfg.image_bce * b_neg
    ann = (cfg.lambda_ann * a * l_ann).sum(dim=1).mean()
    un_pos = ((1.0 - a) * l_pos).sum(dim=1).mean()
    un_neg = ((1.0 - a) * l_neg).sum(dim=1).mean()
    loss = ann + un_pos + un_neg
    return loss, {"ann": ann.detach(), "un_pos": un_pos.detach(), "un_neg": un_neg.detach()}


def compute_gamma(labels: np.ndarray, mode: str) -> np.ndarray:
    """Weight gamma of the negative unannotated terms: ratio of positive to negative examples.

    Args:
        labels: ``(N, K)`` training labels in {0, 1}.
        mode: ``per-class`` (one ratio per class, as Wang et al.), ``global`` (one ratio from all
            classes together) or ``none`` (all ones).

    Returns:
        ``(K,)`` float64. A ratio with no positive or no negative example falls back to 1.

    Example:
        >>> compute_gamma(np.array([[1, 0], [0, 0], [0, 1], [0, 1]]), "per-class").tolist()
        [0.3333333333333333, 1.0]
    """
    arr = np.asarray(labels, dtype=np.float64)
    if arr.ndim != 2:
        raise CxrlocError(f"compute_gamma needs labels of shape (N, K), got {arr.shape}.")
    if not np.all((arr == 0) | (arr == 1)):
        raise CxrlocError("compute_gamma: labels must be 0 or 1.")
    k = arr.shape[1]
    if mode == "none":
        return np.ones(k)
    if mode == "per-class":
        pos, neg = arr.sum(axis=0), (1.0 - arr).sum(axis=0)
    elif mode == "global":
        pos, neg = np.full(k, arr.sum()), np.full(k, (1.0 - arr).sum())
    else:
        raise CxrlocError(f"Unknown gamma mode '{mode}': use per-class, global or none.")
    ok = (pos > 0) & (neg > 0)
    return np.where(ok, pos / np.where(ok, neg, 1.0), 1.0)
