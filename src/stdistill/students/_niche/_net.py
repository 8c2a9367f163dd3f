"""The niche student's network, without Lightning (loading a model to predict needs no trainer)."""

from __future__ import annotations

import torch
from torch import nn

from ._config import NicheStudentConfig

__all__ = ["NicheTransformer", "make_net"]


class NicheTransformer(nn.Module):
    """(B, T, F) features, (B, T, 2) offsets / radius, (B, T) mask -> (B, K) logits.

    Token 0 is the centre spot. With ``summary_token`` a neighbourhood token (the mean of the
    real tokens' features, with its own learned embedding) is added; the head reads the
    centre's and the summary's outputs.
    """

    def __init__(self, d_feat: int, n_niches: int, d_model: int, n_layers: int, n_heads: int, dropout: float,
                 summary_token: bool = True):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(d_feat), nn.Dropout(dropout), nn.Linear(d_feat, d_model))
        self.pos = nn.Sequential(nn.Linear(2, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.centre = nn.Parameter(torch.zeros(d_model))
        self.summary = nn.Parameter(torch.zeros(d_model)) if summary_token else None
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        n_out = 2 if summary_token else 1
        self.head = nn.Sequential(nn.LayerNorm(n_out * d_model), nn.Linear(n_out * d_model, n_niches))

    def forward(self, x, off, mask):
        h = self.inp(x) + self.pos(off)
        h[:, 0] = h[:, 0] + self.centre
        if self.summary is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            mean = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
            hs = (self.inp(mean) + self.summary).unsqueeze(1)
            h = torch.cat([h[:, :1], hs, h[:, 1:]], 1)
            mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]), mask[:, 1:]], 1)
        h = self.encoder(h, src_key_padding_mask=~mask)
        return self.head(h[:, :2].flatten(1) if self.summary is not None else h[:, 0])


def make_net(cfg: NicheStudentConfig, d_in: int) -> NicheTransformer:
    """The untrained network of ``cfg`` for ``d_in`` input features."""
    return NicheTransformer(d_in, cfg.n_niches, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.dropout, cfg.summary_token)
