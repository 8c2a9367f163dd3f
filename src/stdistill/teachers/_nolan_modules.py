"""The NOLAN-like niche teacher's network and LightningModule, at module level (picklable,
checkpointable); see :mod:`stdistill.teachers.niche`."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class SetEncoder(nn.Module):
    """Tokens (B, T, d_in) with offsets (B, T, 2) and mask (B, T) -> (B, d_model): embedding +
    learned relative-position encoding, then masked attention pooling. Token 0 is the centre."""

    def __init__(self, d_in: int, d_model: int):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(d_in, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.pos = nn.Sequential(nn.Linear(2, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.centre = nn.Parameter(torch.zeros(d_model))
        self.att = nn.Linear(d_model, 1)
        self.out = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, x, off, mask):
        h = self.inp(x) + self.pos(off)
        h[:, 0] = h[:, 0] + self.centre
        a = self.att(torch.tanh(h)).squeeze(-1).masked_fill(~mask, float("-inf"))
        w = torch.softmax(a, dim=1).unsqueeze(-1)
        return self.out((w * h).sum(1))


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float, iters: int = 3) -> torch.Tensor:
    """(B, K) Sinkhorn-balanced assignments of (B, K) scores (rows sum to 1, columns to B/K)."""
    q = torch.exp((scores - scores.max()) / eps).T  # K x B
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    return (q * b).T


class NolanLike(L.LightningModule):
    """Set encoder + K prototypes, trained by swapped prediction between a spot's global and
    local neighbourhood views (SwAV-style, Sinkhorn-balanced targets).

    Parameters: ``d_in`` embedding width, ``n_niches`` K, ``d_model`` encoder width, ``tau``
    softmax temperature, ``lr`` AdamW learning rate, ``sinkhorn_eps`` Sinkhorn temperature,
    ``token_drop`` share of neighbour tokens dropped per step, ``noise`` sd of Gaussian noise
    added to the embeddings while training.
    """

    def __init__(self, d_in: int, n_niches: int, d_model: int, tau: float, lr: float, sinkhorn_eps: float,
                 token_drop: float, noise: float):
        super().__init__()
        self.save_hyperparameters()
        self.enc = SetEncoder(d_in, d_model)
        self.protos = nn.Linear(d_model, n_niches, bias=False)

    def scores(self, x, off, mask):
        """(B, K) cosine similarities of the view's encoding to the prototypes."""
        z = nn.functional.normalize(self.enc(x, off, mask), dim=-1)
        w = nn.functional.normalize(self.protos.weight, dim=-1)
        return z @ w.T

    def training_step(self, batch, _):
        hp = self.hparams
        x, off, gmask, lmask = batch
        if hp.noise > 0:
            x = x + hp.noise * torch.randn_like(x)
        keep = torch.rand(gmask.shape, device=gmask.device) >= hp.token_drop
        keep[:, 0] = True
        # random rotation of offsets: tissue orientation is arbitrary
        th = torch.rand(x.shape[0], device=x.device) * 2 * torch.pi
        rot = torch.stack([torch.stack([th.cos(), -th.sin()], -1), torch.stack([th.sin(), th.cos()], -1)], -2)
        off = torch.einsum("bij,btj->bti", rot, off)
        s_g = self.scores(x, off, gmask & keep)
        s_l = self.scores(x, off, lmask & keep)
        q_g, q_l = sinkhorn(s_g.detach(), hp.sinkhorn_eps), sinkhorn(s_l.detach(), hp.sinkhorn_eps)
        lp_g = torch.log_softmax(s_g / hp.tau, -1)
        lp_l = torch.log_softmax(s_l / hp.tau, -1)
        loss = -0.5 * ((q_g * lp_l).sum(-1).mean() + (q_l * lp_g).sum(-1).mean())
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
