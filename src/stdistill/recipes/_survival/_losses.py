"""Survival losses and AMKD's distillation terms (tensors in, scalar tensors out).

- :func:`fit_time_bins` / :func:`time_to_bin`: MCAT's discrete time bins, fitted on the
  **training** patients' event times only (MCAT fits them on the whole cohort: a leak).
- :func:`nll_loss`: the discrete-time negative log-likelihood of MCAT/SurvPath.
- :func:`cox_loss`: Cox partial likelihood (torchsurv, Efron ties).
- :func:`redundancy_reduction`: cross-correlation of student and teacher embeddings driven to
  the identity (Barlow-Twins form; our reading of AMKD's redundancy reduction), with per-sample
  weights; :func:`whitened_redundancy`: the same loss on the teacher's whitened principal
  directions, so that its identity target can be reached; :func:`discrepancy_weights` makes the
  adaptive weights from the teacher-student prediction discrepancy.
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


def _identity_gap(C: torch.Tensor, offdiag: float) -> torch.Tensor:
    """[sum_i (1 - C_ii)^2 + offdiag * sum_{i != j} C_ij^2] / k of a (k, k) cross-correlation."""
    diag = torch.diagonal(C)
    return (((1 - diag) ** 2).sum() + offdiag * ((C**2).sum() - (diag**2).sum())) / C.shape[0]


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
    return _identity_gap(C, offdiag)


def whitened_redundancy(zs: torch.Tensor, zt: torch.Tensor, weight: torch.Tensor | None = None,
                        offdiag: float = 0.05, dim: int = 16, rel_eps: float = 1e-3) -> torch.Tensor:
    """Redundancy reduction whose identity target is reachable, over the n rows given.

    :func:`redundancy_reduction` asks a (D, D) cross-correlation for the identity, which no student
    can reach when the rows are fewer than D (rank <= n - 1) or the teacher's D dimensions are
    correlated (the student would have to match each teacher dimension and be uncorrelated with its
    correlated neighbours at once). Here the teacher's (n, D) ``zt`` is centred (weighted) and
    projected onto its k leading principal directions, k = min(``dim``, n - 1, eigenvalues above
    ``rel_eps`` x the largest), each scaled to unit weighted variance: k target columns that are
    exactly uncorrelated over the rows. The student's (n, D) ``zs`` is projected onto the same
    directions and standardised (weighted); C = sum_b w_b s_b t_b^T / sum_b w_b (k, k) and
    L = [sum_i (1 - C_ii)^2 + offdiag * sum_{i != j} C_ij^2] / k, which is 0 when the student
    equals the teacher up to a shift and a scale per direction. ``weight`` (n,) >= 0, default 1.
    """
    if zs.shape != zt.shape or zs.ndim != 2:
        raise StdistillError(f"embeddings must both be (n, D), got {tuple(zs.shape)} and {tuple(zt.shape)}")
    w = torch.ones(len(zs), dtype=zs.dtype, device=zs.device) if weight is None else weight.to(zs.dtype)
    w = (w / w.sum().clamp_min(EPS))[:, None]
    with torch.no_grad():
        ct = zt - (w * zt).sum(0)
        val, vec = torch.linalg.eigh((ct * w).T @ ct)  # ascending
        val, vec = val.flip(0), vec.flip(1)
        k = min(int(dim), len(zt) - 1, int((val > rel_eps * val[0].clamp_min(EPS)).sum()))
        if k < 1:
            return zs.sum() * 0.0  # nothing to correlate (one row, or a constant teacher)
        t = (ct @ vec[:, :k]) / val[:k].sqrt()
    s = zs @ vec[:, :k]
    s = s - (w * s).sum(0)
    s = s / ((w * s**2).sum(0).sqrt() + 1e-5)
    return _identity_gap((s * w).T @ t, offdiag)


def discrepancy_weights(risk_teacher: torch.Tensor, risk_student: torch.Tensor, smooth: float = 0.1,
                        down: bool = False) -> torch.Tensor:
    """(B,) adaptive per-sample weights, mean 1, no gradient, from d = the absolute difference of
    the batch-standardised teacher and student risks (a ranking discrepancy, valid for NLL and Cox
    risks alike) plus ``smooth``: w = d (disagreeing samples count more) or, with ``down``, 1 / d
    (agreeing samples count more); divided by the batch mean."""
    with torch.no_grad():
        d = (_zscore(risk_teacher.view(-1, 1)) - _zscore(risk_student.view(-1, 1))).abs().view(-1) + smooth
        d = 1.0 / d if down else d
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
