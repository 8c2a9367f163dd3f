"""GenST's nets. VQ-VAE building blocks: an MLP encoder, a quantiser from vector-quantize-pytorch
(``VectorQuantize`` or ``FSQ``), an MLP decoder, and the likelihoods.

Shapes: B = batch, D = input width, d = latent width, K = codebook size, G = genes.
vector-quantize-pytorch is an optional dependency (``pip install 'stdistill[genst]'``); it is
imported when a quantiser is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..._errors import StdistillError

if TYPE_CHECKING:
    from ._config import GenstConfig

__all__ = ["ConvVQVAE", "GenstNet", "Quantizer", "VQVAE", "mlp", "nb_nll", "import_vq"]


def import_vq():
    """The ``vector_quantize_pytorch`` module, or a one-line install hint."""
    try:
        import vector_quantize_pytorch
    except ImportError:
        raise StdistillError("GenST needs vector-quantize-pytorch: pip install 'stdistill[genst]' "
                             "(or pip install 'vector-quantize-pytorch>=1.20,<2')") from None
    return vector_quantize_pytorch


def mlp(d_in: int, hidden: Sequence[int], d_out: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU (-> Dropout) per hidden width, then a last Linear to ``d_out``."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.LayerNorm(h), nn.GELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d_in = h
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


class Quantizer(nn.Module):
    """One codebook over (B, d) latents: ``kind="vq"`` (``VectorQuantize``: EMA codebook, k-means
    init, dead codes replaced) or ``"fsq"`` (``FSQ``: an implicit grid of ``prod(levels)`` codes).

    ``forward(z)`` -> ``(z_q (B, d), idx (B,) long, loss scalar)``; :meth:`codes` maps (n,) indices
    to their (n, d) vectors.
    """

    def __init__(self, kind: str, dim: int, codebook_size: int, levels: Sequence[int] | None = None,
                 commitment_weight: float = 0.25, decay: float = 0.9, dead_code_threshold: float = 1.0):
        super().__init__()
        vqp = import_vq()
        self.kind = kind
        if kind == "vq":
            self.q = vqp.VectorQuantize(dim=dim, codebook_size=codebook_size, decay=decay, kmeans_init=True,
                                        kmeans_iters=10, commitment_weight=commitment_weight,
                                        threshold_ema_dead_code=dead_code_threshold)
            self.codebook_size = int(codebook_size)
        elif kind == "fsq":
            if not levels:
                raise StdistillError("quantizer 'fsq' needs levels, e.g. (8, 5, 5, 5)")
            self.q = vqp.FSQ(levels=list(levels), dim=dim)
            self.codebook_size = int(math.prod(levels))
        else:
            raise StdistillError(f"quantizer must be 'vq' or 'fsq', got {kind!r}")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.kind == "vq":
            zq, idx, loss = self.q(z)
            return zq, idx.long(), loss.sum()
        zq, idx = self.q(z.unsqueeze(1))
        return zq.squeeze(1), idx.squeeze(1).long(), z.new_zeros(())

    def codes(self, idx: torch.Tensor) -> torch.Tensor:
        """(n,) code indices -> (n, d) quantised latents (what the decoder reads)."""
        if self.kind == "vq":
            return self.q.get_output_from_indices(idx)
        return self.q.indices_to_codes(idx.unsqueeze(1)).squeeze(1)


class VQVAE(nn.Module):
    """MLP encoder -> :class:`Quantizer` -> MLP decoder.

    ``forward(x)`` with x (B, D) -> dict ``z`` (B, d) continuous latent, ``zq`` (B, d) quantised,
    ``idx`` (B,) code, ``vq_loss`` scalar, ``out`` (B, d_out) decoder output. The decoder reads only
    the quantised latent, so its output for code k is one row of :meth:`code_table`.
    """

    def __init__(self, d_in: int, d_out: int, latent_dim: int, hidden: Sequence[int], quantizer: Quantizer,
                 dropout: float = 0.0):
        super().__init__()
        self.encoder = mlp(d_in, hidden, latent_dim, dropout)
        self.quantizer = quantizer
        self.decoder = mlp(latent_dim, list(hidden)[::-1], d_out)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward``'s outputs without the decoder's ``out``."""
        z = self.encoder(x)
        zq, idx, vq_loss = self.quantizer(z)
        return {"z": z, "zq": zq, "idx": idx, "vq_loss": vq_loss}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encode(x)
        return {**h, "out": self.decoder(h["zq"])}

    def code_table(self) -> torch.Tensor:
        """(K, d_out): the decoder's output for every code."""
        idx = torch.arange(self.codebook_size, device=next(self.parameters()).device)
        return self.decoder(self.quantizer.codes(idx))


class ConvVQVAE(nn.Module):
    """Convolutional encoder -> :class:`Quantizer` -> convolutional decoder over (B, 3, px, px) patches.

    Encoder: per ``channels`` entry a stride-2 4x4 convolution (BatchNorm, GELU), then the mean over
    positions and a Linear to the (B, d) latent (one code per patch). Decoder: a Linear to the
    smallest grid and per entry a stride-2 transposed convolution back to (B, 3, px, px). ``forward``
    returns the same dict as :class:`VQVAE` (``out``: the reconstructed patch). BatchNorm rather than
    a per-patch normalisation, which would remove a patch's mean colour.
    """

    def __init__(self, px: int, channels: Sequence[int], latent_dim: int, quantizer: Quantizer, dropout: float = 0.0):
        super().__init__()
        chans = [3, *channels]
        self.grid, self.top = px // 2 ** len(channels), chans[-1]
        enc: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            enc += [nn.Conv2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.GELU()]
        self.encoder = nn.Sequential(*enc, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                     nn.Linear(chans[-1], latent_dim))
        self.quantizer = quantizer
        dec: list[nn.Module] = []
        rev = chans[::-1]
        for a, b in zip(rev[:-1], rev[1:]):
            dec += [nn.ConvTranspose2d(a, b, 4, 2, 1)] + ([nn.BatchNorm2d(b), nn.GELU()] if b != 3 else [])
        self.expand = nn.Linear(latent_dim, self.top * self.grid ** 2)
        self.decoder = nn.Sequential(*dec)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    encode = VQVAE.encode

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encode(x)
        return {**h, "out": self.decoder(self.expand(h["zq"]).view(len(x), self.top, self.grid, self.grid))}


def nb_nll(counts: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Mean negative-binomial negative log-likelihood of (B, G) counts with (B, G) log means and
    (G,) log inverse dispersions (variance = mu + mu^2 / theta)."""
    theta = log_theta.exp()
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    ll = (torch.lgamma(counts + theta) - torch.lgamma(theta) - torch.lgamma(counts + 1)
          + theta * (log_theta - log_theta_mu) + counts * (log_mu - log_theta_mu))
    return -ll.mean()


class GenstNet(nn.Module):
    """Both VQ-VAEs, the cross-modal head and the contrastive projections.

    ``expr``: (B, G + 1) inputs -> (B, G) log NB means (or z-scored log1p for ``mse``); ``log_theta``
    (G,) log inverse dispersions; ``hist``: (B, D) features -> (B, D) (``histology="pixels"``: a
    :class:`ConvVQVAE`, (B, 3, px, px) -> (B, 3, px, px)); ``head``: (B, latent) ->
    (B, K) expression-code logits; ``proj_h``/``proj_e``: (B, latent) -> (B, proj_dim).
    """

    def __init__(self, n_genes: int, n_features: int, cfg: GenstConfig):
        super().__init__()
        qkw = {"levels": cfg.fsq_levels, "commitment_weight": cfg.commitment_weight}
        self.expr = VQVAE(n_genes + 1, n_genes, cfg.latent_dim, cfg.hidden,
                          Quantizer(cfg.quantizer, cfg.latent_dim, cfg.codebook_size, **qkw))
        self.log_theta = nn.Parameter(torch.full((n_genes,), math.log(5.0)))
        hq = Quantizer(cfg.quantizer, cfg.latent_dim, cfg.hist_codebook_size, **qkw)
        if cfg.histology == "pixels":
            self.hist: nn.Module = ConvVQVAE(cfg.patch_px, cfg.conv_channels, cfg.latent_dim, hq, cfg.dropout)
        else:
            self.hist = VQVAE(n_features, n_features, cfg.latent_dim, cfg.hist_hidden, hq, cfg.dropout)
        self.head = mlp(cfg.latent_dim, cfg.head_hidden, self.expr.codebook_size, cfg.dropout)
        self.proj_h = nn.Linear(cfg.latent_dim, cfg.proj_dim)
        self.proj_e = nn.Linear(cfg.latent_dim, cfg.proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.con_temperature)))
        self.head_input = cfg.head_input

    def code_logits(self, f: torch.Tensor, decode: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, D) features (or (B, 3, px, px) patches) -> (B, K) expression-code logits and the histology
        VQ-VAE's outputs (``decode=False``: without its reconstruction ``out``)."""
        h = self.hist(f) if decode else self.hist.encode(f)
        return self.head(h["zq"] if self.head_input == "quantized" else h["z"]), h
