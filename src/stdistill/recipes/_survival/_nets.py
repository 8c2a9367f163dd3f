"""Networks of the survival recipe. Every net maps a padded batch to a dict:

``forward(bag (B, N, d_in), mask (B, N) bool, genes (B, G) | None, clin (B, C) | None)`` ->
``{"logits": (B, K), "emb": (B, D), "attn": (B, N) | None}``; ``K`` = time bins (NLL) or 1 (Cox),
``emb`` is the representation distilled from (teachers) or into (student).

- :class:`ABMIL`: gated-attention MIL on the slide (Ilse et al. 2018), pathology only. With
  ``projector=True`` it is AMKD's student (the projector maps its embedding into the teacher's
  space during training; predictions never use it).
- :class:`SNN`: genomics only: one self-normalising MLP per gene family (Hallmark set) gives a
  token per family; tokens are attention-pooled.
- :class:`LateFusion`: the pathology and genomic branches, concatenated (multimodal baseline; AMKD
  "without the enhancement module" distils from its pathology embedding).
- :class:`GGETeacher`: AMKD's teacher: the gene-guided enhancement module (genomic tokens attend
  over the instances, MCAT's genomic-guided co-attention) yields one enhanced pathology token per
  gene family; their attention pool is the *enhanced pathology feature* the student learns.
- :class:`ClinicalNet`: a linear head on standardised clinical columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

KINDS = ("abmil", "snn", "late_fusion", "gge", "student", "clinical")
USES_GENES = {"snn", "late_fusion", "gge"}
USES_BAG = {"abmil", "late_fusion", "gge", "student"}


class GatedAttention(nn.Module):
    """Gated attention pooling: a = softmax(w^T (tanh(V h) * sigmoid(U h))) over the N items."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D), (B, N) -> pooled (B, D), attention (B, N) (0 on padding)."""
        s = self.w(self.v(h) * self.u(h)).squeeze(-1)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        a = torch.softmax(s, dim=1)
        return torch.bmm(a.unsqueeze(1), h).squeeze(1), a


def _mlp(d_in: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout))


class PathologyBranch(nn.Module):
    """Instances -> FC -> gated attention -> rho: ``forward(bag, mask)`` -> (emb (B, D), attn (B, N))."""

    def __init__(self, d_in: int, dim: int, dropout: float):
        super().__init__()
        self.enc = _mlp(d_in, dim, dropout)
        self.pool = GatedAttention(dim, dim, dropout)
        self.rho = _mlp(dim, dim, dropout)

    def forward(self, bag: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, a = self.pool(self.enc(bag), mask)
        return self.rho(p), a


class GenomicTokens(nn.Module):
    """One SNN (Linear-ELU-AlphaDropout, twice) per gene family: (B, G) -> (B, n_families, D).

    ``groups``: for each family, the column indices of its genes in the (B, G) input.
    """

    def __init__(self, groups: Sequence[Sequence[int]], dim: int, dropout: float):
        super().__init__()
        self.snns = nn.ModuleList(
            nn.Sequential(nn.Linear(len(g), dim), nn.ELU(), nn.AlphaDropout(dropout),
                          nn.Linear(dim, dim), nn.ELU(), nn.AlphaDropout(dropout)) for g in groups)
        for i, g in enumerate(groups):
            self.register_buffer(f"idx{i}", torch.as_tensor(list(g), dtype=torch.long), persistent=False)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        return torch.stack([snn(genes[:, getattr(self, f"idx{i}")]) for i, snn in enumerate(self.snns)], dim=1)


class GenomicBranch(nn.Module):
    """Family tokens -> gated attention -> rho: ``forward(genes)`` -> (emb (B, D), tokens (B, T, D))."""

    def __init__(self, groups: Sequence[Sequence[int]], dim: int, dropout: float):
        super().__init__()
        self.tokens = GenomicTokens(groups, dim, dropout)
        self.pool = GatedAttention(dim, dim, dropout)
        self.rho = _mlp(dim, dim, dropout)

    def forward(self, genes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokens(genes)
        return self.rho(self.pool(t)[0]), t


class ABMIL(nn.Module):
    """Pathology-only gated-attention MIL (the baseline, and AMKD's student with ``projector``)."""

    def __init__(self, d_in: int, n_out: int, dim: int, dropout: float, projector: bool = False):
        super().__init__()
        self.path = PathologyBranch(d_in, dim, dropout)
        self.head = nn.Linear(dim, n_out)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) if projector else None

    def forward(self, bag, mask, genes=None, clin=None) -> dict[str, torch.Tensor]:
        emb, attn = self.path(bag, mask)
        return {"logits": self.head(emb), "emb": emb, "attn": attn}


class SNN(nn.Module):
    """Genomics-only survival network over gene-family tokens."""

    def __init__(self, groups: Sequence[Sequence[int]], n_out: int, dim: int, dropout: float):
        super().__init__()
        self.gen = GenomicBranch(groups, dim, dropout)
        self.head = nn.Linear(dim, n_out)

    def forward(self, bag, mask, genes=None, clin=None) -> dict[str, torch.Tensor]:
        emb, _ = self.gen(genes)
        return {"logits": self.head(emb), "emb": emb, "attn": None}


class LateFusion(nn.Module):
    """Pathology and genomic embeddings concatenated; ``emb`` = the pathology embedding."""

    def __init__(self, d_in: int, groups: Sequence[Sequence[int]], n_out: int, dim: int, dropout: float):
        super().__init__()
        self.path = PathologyBranch(d_in, dim, dropout)
        self.gen = GenomicBranch(groups, dim, dropout)
        self.fuse = _mlp(2 * dim, dim, dropout)
        self.head = nn.Linear(dim, n_out)

    def forward(self, bag, mask, genes=None, clin=None) -> dict[str, torch.Tensor]:
        p, attn = self.path(bag, mask)
        g, _ = self.gen(genes)
        return {"logits": self.head(self.fuse(torch.cat([p, g], dim=1))), "emb": p, "attn": attn}


class GGETeacher(nn.Module):
    """Multimodal teacher with the gene-guided enhancement module.

    Instances h (B, N, D) and family tokens g (B, T, D); co-attention with g as queries over h
    (one head, padding masked) gives T gene-guided pathology tokens, added to g (the residual
    injects the genomic information) and refined by a feed-forward block (post-norm transformer
    decoder layer); their gated-attention pool (-> rho) is the enhanced pathology feature ``emb``
    (B, D). The genomic tokens are pooled separately; both are concatenated for the
    prediction. ``attn`` (B, N): the co-attention averaged over the families.
    """

    def __init__(self, d_in: int, groups: Sequence[Sequence[int]], n_out: int, dim: int, dropout: float):
        super().__init__()
        self.enc = _mlp(d_in, dim, dropout)
        self.gen = GenomicBranch(groups, dim, dropout)
        self.coattn = nn.MultiheadAttention(dim, num_heads=1, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.pool = GatedAttention(dim, dim, dropout)
        self.rho = _mlp(dim, dim, dropout)
        self.fuse = _mlp(2 * dim, dim, dropout)
        self.head = nn.Linear(dim, n_out)

    def forward(self, bag, mask, genes=None, clin=None) -> dict[str, torch.Tensor]:
        h = self.enc(bag)
        g, tokens = self.gen(genes)
        e, a = self.coattn(tokens, h, h, key_padding_mask=~mask, need_weights=True)  # (B, T, D), (B, T, N)
        e = self.norm1(tokens + e)  # genomic information injected into the pathology tokens
        e = self.norm2(e + self.ffn(e))
        p = self.rho(self.pool(e)[0])
        return {"logits": self.head(self.fuse(torch.cat([p, g], dim=1))), "emb": p, "attn": a.mean(1)}


class ClinicalNet(nn.Module):
    """A linear head on (B, C) standardised clinical columns (``emb`` = the input)."""

    def __init__(self, n_clin: int, n_out: int, dropout: float):
        super().__init__()
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(n_clin, n_out))

    def forward(self, bag, mask, genes=None, clin=None) -> dict[str, torch.Tensor]:
        return {"logits": self.head(clin), "emb": clin, "attn": None}


def build_net(kind: str, *, d_in: int, n_out: int, dim: int, dropout: float,
              groups: Sequence[Sequence[int]] = (), n_clin: int = 0) -> nn.Module:
    """The network of ``kind`` (one of :data:`KINDS`)."""
    if kind in ("abmil", "student"):
        return ABMIL(d_in, n_out, dim, dropout, projector=kind == "student")
    if kind == "snn":
        return SNN(groups, n_out, dim, dropout)
    if kind == "late_fusion":
        return LateFusion(d_in, groups, n_out, dim, dropout)
    if kind == "gge":
        return GGETeacher(d_in, groups, n_out, dim, dropout)
    if kind == "clinical":
        return ClinicalNet(n_clin, n_out, dropout)
    raise ValueError(kind)
