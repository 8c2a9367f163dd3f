"""Survival losses and AMKD's distillation terms (tensors in, scalar tensors out).

- :func:`fit_time_bins` / :func:`time_to_bin`: MCAT's discrete time bins, fitted on the
  **training** patients' event times only (MCAT fits them on the whole cohort: a leak).
- :func:`nll_loss`: the discrete-time negative log-likelihood of MCAT/SurvPath.
- :func:`cox_loss`: Cox partial likelihood (torchsurv, Efron ties).
- :func:`redundancy_reduction`: cross-correlation of student and teacher embeddings driven to
  the identity (Barlow-Twins form), with per-sample weights; :func:`discrepancy_weights` makes
  AMKD's adaptive weights from the teacher-student prediction discrepancy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..._errors import StdistillError

EPS = 1e-7


def fit_time_bins(time: np.ndarray, event: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """(n_bins + 1,) bin edges: ``-inf``, the 1/K ... (K-1)/K quantiles of the **event** times
    given, ``+inf``. Pass the training patients only. Tied quantiles (few events) collapse, leaving
    fewer populated bins; the number of model outputs stays ``n_bins``."""
    t = np.asarray(time, dtype=np.float64)[np.asarray(event).astype(bool)]
    if n_bins < 1:
        raise StdistillError(f"n_bins must be >= 1, got {n_bins}")
    if t.size == 0:
        raise StdistillError("the training patients have no event: time bins cannot be fitted")
    inner = np.quantile(t, np.arange(1, n_bins) / n_bins) if n_bins > 1 else np.empty(0)
    return np.concatenate([[-np.inf], inner, [np.inf]])


def time_to_bin(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(n,) int64 bin of each time: bin k holds ``edges[k] <= t < edges[k + 1]`` (MCAT's
    ``pd.cut(right=False)``), clipped to the number of bins."""
    k = len(edges) - 1
    return np.clip(np.searchsorted(np.asarray(edges)[1:-1], np.asarray(time, dtype=np.float64), side="right"), 0, k - 1)


def nll_loss(logits: torch.Tensor, y: torch.Tensor, event: torch.Tensor, alpha: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
    """Discrete-time NLL (MCAT/SurvPath). ``logits`` (B, K), ``y`` (B,) bin, ``event`` (B,) 0/1.

    h = sigmoid(logits), S = cumprod(1 - h), S_{-1} = 1, c = 1 - event;
    L_unc = -(1 - c)[log S_{y-1} + log h_y], L_cen = -c log S_y, L = L_unc + (1 - alpha) L_cen,
    logs clamped at 1e-7. MCAT: alpha = 0, mean; SurvPath: alpha = 0.5, sum.
    """
    h = torch.sigmoid(logits)
    S = torch.cumprod(1 - h, dim=1)
    S_pad = torch.cat([torch.ones_like(S[:, :1]), S], dim=1)
    y = y.long().view(-1, 1)
    c = 1.0 - event.float().view(-1, 1)
    unc = -(1 - c) * (torch.log(S_pad.gather(1, y).clamp_min(EPS)) + torch.log(h.gather(1, y).clamp_min(EPS)))
    cen = -c * torch.log(S_pad.gather(1, y + 1).clamp_min(EPS))
    loss = unc + (1 - alpha) * cen
    return loss.mean() if reduction == "mean" else loss.sum()


def nll_risk(logits: torch.Tensor) -> torch.Tensor:
    """(B,) risk = -sum_k S_k (higher = earlier event), MCAT's score for the C-index."""
    return -torch.cumprod(1 - torch.sigmoid(logits), dim=1).sum(1)


def cox_loss(log_hz: torch.Tensor, event: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (torchsurv, Efron ties, mean over events); 0 (with a
    gradient path) for a batch without events."""
    if not bool(event.bool().any()):
        return log_hz.sum() * 0.0
    import warnings

    from torchsurv.loss.cox import neg_partial_log_likelihood

    with warnings.catch_warnings():  # tied times are expected (Efron handles them); torchsurv warns each batch
        warnings.filterwarnings("ignore", message="Ties in `time` detected")
        return neg_partial_log_likelihood(log_hz.view(-1), event.bool().view(-1), time.float().view(-1),
                                          ties_method="efron", reduction="mean")


def _zscore(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return (x - x.mean(0)) / (x.std(0, unbiased=False) + eps)


def redundancy_reduction(zs: torch.Tensor, zt: torch.Tensor, weight: torch.Tensor | None = None,
                         offdiag: float = 0.05) -> torch.Tensor:
    """Cross-correlation loss between (B, D) student ``zs`` and teacher ``zt`` embeddings.

    Both are standardised over the batch; C = sum_b w_b zs_b zt_b^T / sum_b w_b (D, D);
    L = [sum_i (1 - C_ii)^2 + offdiag * sum_{i != j} C_ij^2] / D. ``weight`` (B,) >= 0, default 1.
    """
    if zs.shape != zt.shape or zs.ndim != 2:
        raise StdistillError(f"embeddings must both be (B, D), got {tuple(zs.shape)} and {tuple(zt.shape)}")
    w = torch.ones(len(zs), device=zs.device) if weight is None else weight.to(zs.dtype)
    w = w / w.sum().clamp_min(EPS)
    C = (_zscore(zs) * w[:, None]).T @ _zscore(zt)
    diag = torch.diagonal(C)
    on = ((1 - diag) ** 2).sum()
    off = (C**2).sum() - (diag**2).sum()
    return (on + offdiag * off) / zs.shape[1]


def discrepancy_weights(risk_teacher: torch.Tensor, risk_student: torch.Tensor, smooth: float = 0.1) -> torch.Tensor:
    """(B,) AMKD's adaptive per-sample weights, mean 1, no gradient: the absolute difference of the
    batch-standardised teacher and student risks (a ranking discrepancy, valid for NLL and Cox
    risks alike), plus ``smooth``, divided by its batch mean."""
    with torch.no_grad():
        d = (_zscore(risk_teacher.view(-1, 1)) - _zscore(risk_student.view(-1, 1))).abs().view(-1) + smooth
        return d / d.mean()


def feature_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity of (B, D) projected student and (B, D) teacher features."""
    return 1.0 - F.cosine_similarity(student, teacher, dim=1).mean()


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """Plain prediction KD: MSE between logits (``loss="nll"``, (B, K)) or between batch-standardised
    risks (``"cox"``, (B, 1); Cox risks are defined up to a shift)."""
    if loss == "cox":
        return F.mse_loss(_zscore(student.view(-1, 1)), _zscore(teacher.view(-1, 1)))
    return F.mse_loss(student, teacher)
