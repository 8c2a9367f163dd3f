"""Distillation losses shared by the recipes. Shapes: B = batch, K = classes/niches, D = embedding dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student), multiplied by T^2 (Hinton et al. 2015).

    Parameters
    ----------
    student_logits
        (B, K) raw student logits.
    teacher_probs
        (B, K) teacher probabilities *at temperature 1*; they are re-tempered here as
        ``softmax(log p / T)`` so soft labels from any teacher (GMM posteriors, prototype
        assignments, classifier outputs) are treated alike.
    """
    t = temperature
    log_p_t = torch.log(teacher_probs.clamp_min(1e-8))
    soft_t = F.softmax(log_p_t / t, dim=-1)
    log_soft_s = F.log_softmax(student_logits / t, dim=-1)
    return F.kl_div(log_soft_s, soft_t, reduction="batchmean") * (t * t)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float = 2.0,
    hard_weight: float = 0.0,
) -> torch.Tensor:
    """``(1 - hard_weight) * kd_kl + hard_weight * CE(student, argmax teacher)``.

    PEKA's public code uses ``hard_weight=0.5``; the niche recipe defaults to 0.
    """
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")
    loss = (1.0 - hard_weight) * kd_kl(student_logits, teacher_probs, temperature)
    if hard_weight > 0:
        loss = loss + hard_weight * F.cross_entropy(student_logits, teacher_probs.argmax(dim=-1))
    return loss


def structure_alignment(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Match within-batch cosine-similarity matrices: mean squared difference of (B, B) matrices.

    ``student_emb`` (B, D_s) and ``teacher_emb`` (B, D_t) may have different widths. The
    diagonal (always 1) is excluded.
    """
    s = F.normalize(student_emb, dim=-1)
    t = F.normalize(teacher_emb, dim=-1)
    sim_s, sim_t = s @ s.T, t @ t.T
    b = sim_s.shape[0]
    if b < 2:
        return student_emb.sum() * 0.0
    off = ~torch.eye(b, dtype=torch.bool, device=sim_s.device)
    return F.mse_loss(sim_s[off], sim_t[off])


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) between two (B, D) embeddings of the same B spots.

    Row i of ``a`` and row i of ``b`` are the positive pair; every other row of the batch is a
    negative. Both are L2-normalised; similarities are multiplied by ``exp(logit_scale)`` (the
    inverse temperature, clamped at 100 as CLIP does). Mean of the a->b and b->a cross-entropies.
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=a.dtype, device=a.device).exp().clamp(max=100.0)
    logits = scale * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
