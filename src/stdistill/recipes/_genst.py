"""GenST: a spot's expression generated from its histology through two aligned discrete latent spaces.

GenST (seed paper 004) learns a VQ-VAE per modality and aligns them:

1. **Expression VQ-VAE** (stage 1): the encoder reads the spot's log-normalised expression of the
   fold's genes (``log1p`` counts per 10,000 of the spot's library, z-scored per gene on the
   training spots) plus its z-scored log library size; a codebook (``VectorQuantize`` or ``FSQ``
   from vector-quantize-pytorch); the decoder maps a code to a negative-binomial mean of every
   gene's **raw** count (gene-wise dispersion), so depth is part of what a code carries: at
   generation time no library size is observed, and the evaluation targets are unnormalised
   ``log1p`` counts (HEST). ``likelihood="mse"`` regresses z-scored ``log1p`` counts instead.
2. **Histology VQ-VAE** (stage 2) over cached patch features ``obsm["X_<encoder>"]`` of any
   registered encoder (z-scored, clipped), reconstructing them (MSE), trained jointly with
3. **alignment**: symmetric InfoNCE between projections of the two quantised latents of the same
   spot, and a cross-modal head predicting the spot's expression code from the histology latent
   (cross-entropy). The expression VQ-VAE is frozen in stage 2, so the code targets do not move.

Generation: histology -> head -> distribution p(k) over expression codes -> the decoder's output
for each code. The point prediction is the mixture mean ``sum_k p_k log1p(mu_k)`` (``obsm[
"genst_pred"]``), its spread the mixture SD (``obsm["genst_sd"]``); :meth:`GenST.sample` draws
codes (temperature, top-k) and optionally counts, seeded. Settings and alignment epochs are
chosen on validation patients inside the training patients (:func:`select_genst`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from .._errors import StdistillError
from .._utils import load_safetensors_dir, load_state, save_safetensors_dir, seed_everything
from ..metrics import pearson_per_gene
from ..students.niche import _threads
from ..students._vqvae import VQVAE, Quantizer, mlp, nb_nll

__all__ = ["GenST", "GenstConfig", "GenstNet", "ExprVQModule", "AlignModule", "codebook_stats", "select_genst"]

_FORMAT = "stdistill.GenST/1"
_WEIGHTS = "model.safetensors"
_PREP = ("feat_mean", "feat_sd", "expr_mean", "expr_sd", "y_mean", "y_sd")


@dataclass
class GenstConfig:
    """Settings of one GenST run.

    ``codebook_size``/``hist_codebook_size``: codes of the expression / histology ``VectorQuantize``
    (``quantizer="fsq"``: ``FSQ`` with ``prod(fsq_levels)`` codes for both). ``expr_epochs``: stage 1;
    ``max_epochs``: stage 2 (alignment; chosen by :func:`select_genst`). ``head_input``:
    ``"quantized"`` (the head reads the histology code's vector: at most ``hist_codebook_size``
    distinct predictions) or ``"continuous"`` (the encoder's latent before quantisation).
    ``temperature``/``top_k``: how expression codes are drawn for the spread and :meth:`GenST.sample`.
    """

    codebook_size: int = 64
    hist_codebook_size: int = 64
    quantizer: str = "vq"
    fsq_levels: tuple[int, ...] = (8, 5, 5)
    latent_dim: int = 32
    hidden: tuple[int, ...] = (128,)
    hist_hidden: tuple[int, ...] = (256,)
    head_hidden: tuple[int, ...] = (128,)
    proj_dim: int = 32
    likelihood: str = "nb"
    commitment_weight: float = 0.25
    expr_epochs: int = 80
    max_epochs: int = 30
    patience: int = 8
    maximize: bool = True
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    dropout: float = 0.1
    w_rec: float = 1.0
    w_ce: float = 1.0
    w_con: float = 0.5
    con_temperature: float = 0.1
    head_input: str = "quantized"
    feature_clip: float = 10.0
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self):
        self.fsq_levels, self.hidden = tuple(self.fsq_levels), tuple(self.hidden)
        self.hist_hidden, self.head_hidden = tuple(self.hist_hidden), tuple(self.head_hidden)
        choices = {"quantizer": ("vq", "fsq"), "likelihood": ("nb", "mse"), "head_input": ("quantized", "continuous")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise StdistillError(f"{k} must be one of {allowed}, got {getattr(self, k)!r}")
        for k in ("codebook_size", "hist_codebook_size", "latent_dim", "batch_size", "expr_epochs"):
            if getattr(self, k) < 1:
                raise StdistillError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("w_rec", "w_ce", "w_con", "max_epochs"):
            if getattr(self, k) < 0:
                raise StdistillError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.temperature <= 0 or self.con_temperature <= 0:
            raise StdistillError("temperature and con_temperature must be > 0")
        if self.top_k is not None and self.top_k < 1:
            raise StdistillError(f"top_k must be >= 1 or None, got {self.top_k}")


# ============================================================================ nets
class GenstNet(nn.Module):
    """Both VQ-VAEs, the cross-modal head and the contrastive projections.

    ``expr``: (B, G + 1) inputs -> (B, G) log NB means (or z-scored log1p for ``mse``); ``log_theta``
    (G,) log inverse dispersions; ``hist``: (B, D) features -> (B, D); ``head``: (B, latent) ->
    (B, K) expression-code logits; ``proj_h``/``proj_e``: (B, latent) -> (B, proj_dim).
    """

    def __init__(self, n_genes: int, n_features: int, cfg: GenstConfig):
        super().__init__()
        qkw = {"levels": cfg.fsq_levels, "commitment_weight": cfg.commitment_weight}
        self.expr = VQVAE(n_genes + 1, n_genes, cfg.latent_dim, cfg.hidden,
                          Quantizer(cfg.quantizer, cfg.latent_dim, cfg.codebook_size, **qkw))
        self.log_theta = nn.Parameter(torch.full((n_genes,), math.log(5.0)))
        self.hist = VQVAE(n_features, n_features, cfg.latent_dim, cfg.hist_hidden,
                          Quantizer(cfg.quantizer, cfg.latent_dim, cfg.hist_codebook_size, **qkw), cfg.dropout)
        self.head = mlp(cfg.latent_dim, cfg.head_hidden, self.expr.codebook_size, cfg.dropout)
        self.proj_h = nn.Linear(cfg.latent_dim, cfg.proj_dim)
        self.proj_e = nn.Linear(cfg.latent_dim, cfg.proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.con_temperature)))
        self.head_input = cfg.head_input

    def code_logits(self, f: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, D) features -> (B, K) expression-code logits and the histology VQ-VAE's outputs."""
        h = self.hist(f)
        return self.head(h["zq"] if self.head_input == "quantized" else h["z"]), h


def _epoch_means(acc: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in acc.items() if v}


class ExprVQModule(L.LightningModule):
    """Stage 1: the expression VQ-VAE on (n, G + 1) inputs ``x`` and (n, G) targets ``y`` (raw
    counts for ``nb``, z-scored log1p for ``mse``). Batches are (B,) row indices."""

    def __init__(self, net: GenstNet, cfg: GenstConfig, x: torch.Tensor, y: torch.Tensor):
        super().__init__()
        self.net, self.cfg = net, cfg
        self.register_buffer("x", x, persistent=False)
        self.register_buffer("y", y, persistent=False)
        self.history: list[dict] = []
        self._acc: dict[str, list[float]] = {"rec": [], "vq": []}

    def on_fit_start(self):
        self.net.train()  # Lightning keeps the mode a module arrives in

    def training_step(self, batch, _):
        i = batch[0]
        out = self.net.expr(self.x[i])
        if self.cfg.likelihood == "nb":
            rec = nb_nll(self.y[i], out["out"].clamp(max=20.0), self.net.log_theta)
        else:
            rec = F.mse_loss(out["out"], self.y[i])
        self._acc["rec"].append(float(rec.detach()))
        self._acc["vq"].append(float(out["vq_loss"].detach()))
        return rec + out["vq_loss"]

    def on_train_epoch_end(self):
        self.history.append({"stage": "expr", "epoch": self.current_epoch + 1, **_epoch_means(self._acc)})
        self._acc = {k: [] for k in self._acc}

    def configure_optimizers(self):
        params = [*self.net.expr.parameters(), self.net.log_theta]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


class AlignModule(L.LightningModule):
    """Stage 2: histology VQ-VAE + cross-modal head + contrastive projections, with the expression
    VQ-VAE frozen. Training data: ``f`` (n, D) features, ``code`` (n,) expression codes, ``zq`` (n,
    latent) quantised expression latents. Validation (optional): ``val_f`` (m, D) and ``val_y`` (m, G)
    log1p targets scored by the mean Pearson of the generated expression (``table``: (K, G) log1p
    output per code); the best epoch's weights are kept."""

    _trained = ("hist", "head", "proj_h", "proj_e", "logit_scale")

    def __init__(self, net: GenstNet, cfg: GenstConfig, data: dict[str, torch.Tensor], table: torch.Tensor,
                 val: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.net, self.cfg = net, cfg
        for k, v in {**data, **{f"val_{k}": v for k, v in (val or {}).items()}, "table": table}.items():
            self.register_buffer(k, v, persistent=False)
        self.has_val = val is not None
        self.history: list[dict] = []
        self.val_scores: list[float] = []
        self.best_state: dict | None = None
        self._acc: dict[str, list[float]] = {"rec_h": [], "vq_h": [], "ce": [], "con": []}

    def on_fit_start(self):
        self.net.train()
        self.net.expr.eval()  # frozen

    def training_step(self, batch, _):
        from ..losses import info_nce

        i, cfg = batch[0], self.cfg
        logits, h = self.net.code_logits(self.f[i])
        terms = {"rec_h": F.mse_loss(h["out"], self.f[i]), "vq_h": h["vq_loss"], "ce": F.cross_entropy(logits, self.code[i])}
        if cfg.w_con > 0 and len(i) > 1:
            terms["con"] = info_nce(self.net.proj_h(h["zq"]), self.net.proj_e(self.zq[i]), self.net.logit_scale)
        for k, v in terms.items():
            self._acc[k].append(float(v.detach()))
        w = {"rec_h": cfg.w_rec, "vq_h": 1.0, "ce": cfg.w_ce, "con": cfg.w_con}
        return sum(w[k] * v for k, v in terms.items())

    def validation_step(self, batch, _):
        r = generated_pearson(self.net, self.val_f, self.val_y, self.table)
        self.log("val_loss", -r if np.isfinite(r) else 1.0, on_epoch=True, batch_size=len(self.val_f))
        if not self.trainer.sanity_checking:
            if not self.val_scores or r > max(self.val_scores):
                self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            self.val_scores.append(r)

    def on_train_epoch_end(self):
        row = {"stage": "align", "epoch": self.current_epoch + 1, **_epoch_means(self._acc)}
        if self.val_scores and len(self.val_scores) == self.current_epoch + 1:
            row["val_r"] = self.val_scores[-1]
        self.history.append(row)
        self._acc = {k: [] for k in self._acc}

    def configure_optimizers(self):
        params = [p for n, p in self.net.named_parameters() if n.split(".")[0] in self._trained]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


@torch.no_grad()
def generated_pearson(net: GenstNet, f: torch.Tensor, y: torch.Tensor, table: torch.Tensor) -> float:
    """Mean over genes of the Pearson r between measured (m, G) ``y`` and the mixture-mean generation."""
    was = net.training
    net.eval()
    pred = torch.softmax(net.code_logits(f)[0], -1) @ table
    net.train(was)
    r = pearson_per_gene(y.cpu().numpy(), pred.cpu().numpy()).to_numpy()
    return float(np.nanmean(r)) if np.isfinite(r).any() else 0.0


def _fit_module(module: L.LightningModule, n: int, epochs: int, cfg: GenstConfig, trainer_kw: dict,
                val: bool = False) -> None:
    """Train ``module`` on row indices 0..n-1 (seeded shuffle) for ``epochs`` (early stopping on
    ``val_loss`` with ``cfg.patience`` when ``val``)."""
    from torch.utils.data import DataLoader, TensorDataset

    from .._lightning import make_trainer, quiet

    if epochs < 1:
        return
    g = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, n)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=bs, shuffle=True, generator=g,
                        drop_last=n > bs and n % bs == 1)  # a last batch of one spot has no InfoNCE negatives
    vloader = DataLoader(TensorDataset(torch.zeros(1)), batch_size=1) if val else None
    with quiet(), warnings.catch_warnings():
        trainer = make_trainer(max_epochs=epochs, monitor="val_loss" if val else None, patience=cfg.patience,
                               num_sanity_val_steps=0, enable_progress_bar=False, **trainer_kw)
        trainer.fit(module, loader, vloader)


# ============================================================================ data
def _counts(adata: ad.AnnData, genes: Sequence[str], layer: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(n, G) float32 raw counts of ``genes`` and (n,) library sizes (all genes; at least 1)."""
    X = adata.layers[layer] if layer else adata.X
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    pos = adata.var_names.get_indexer(list(genes))
    if (pos < 0).any():
        missing = [g for g, p in zip(genes, pos) if p < 0]
        raise StdistillError(f"{len(missing)} genes of the model are not in the data (e.g. {missing[:5]})")
    lib = np.maximum(np.asarray(X.sum(1)).ravel(), 1.0)
    return X[:, pos].toarray().astype(np.float32), lib.astype(np.float32)


def _expr_inputs(C: np.ndarray, lib: np.ndarray) -> np.ndarray:
    """(n, G + 1): log1p counts per 10,000 of the library, then log library size."""
    return np.hstack([np.log1p(C / lib[:, None] * 1e4), np.log(lib)[:, None]]).astype(np.float32)


def _zscore_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and SDs with a floor (a column constant on the training spots keeps a usable scale)."""
    mu, sd = X.mean(0), X.std(0)
    floor = 1e-3 * float(np.median(sd[sd > 0])) if (sd > 0).any() else 1.0
    return mu.astype(np.float32), np.maximum(sd, floor).astype(np.float32)


def codebook_stats(idx: np.ndarray, codebook_size: int, collapse_share: float = 0.1) -> dict:
    """Usage of a codebook from (n,) code indices: codes used, perplexity (exp entropy of the code
    frequencies; K = every code equally used), share of the most used code, and ``collapsed``
    (perplexity below ``collapse_share`` x K or at most 2)."""
    counts = np.bincount(np.asarray(idx, dtype=np.int64), minlength=codebook_size)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    perp = float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0
    return {"codebook_size": int(codebook_size), "used": int((counts > 0).sum()), "perplexity": perp,
            "top_share": float(p.max()) if p.size else float("nan"),
            "collapsed": bool(perp < max(2.0, collapse_share * codebook_size))}


def _tempered(logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
    """(n, K) code probabilities: softmax(logits / temperature), only the ``top_k`` largest kept."""
    z = logits / temperature
    if top_k is not None and top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def _frame(values: np.ndarray, adata: ad.AnnData, genes: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(values.astype(np.float32), index=adata.obs_names.copy(), columns=list(genes))


# ============================================================================ estimator
class GenST:
    """GenST as an estimator: ``fit`` on training spots (counts + patch features), then ``predict``
    / ``sample`` expression on any spots or H&E-only tiles with the same encoder's features.

    Parameters
    ----------
    config
        A :class:`GenstConfig`; keyword ``overrides`` replace its fields.
    feature_key
        ``obsm`` key of the (n_spots, D) patch features (``stdistill.features.extract``).
    accelerator, devices
        Lightning's settings (CPU by default: the nets are small).
    num_threads
        torch CPU threads while training and generating (restored afterwards; ``None``: leave as
        is). One thread is fastest for these small nets: on a busy 2-core machine two threads made
        training over 30x slower.
    """

    def __init__(self, config: GenstConfig | None = None, *, feature_key: str = "X_effnet-lite0-imagenet",
                 accelerator: str = "cpu", devices="auto", num_threads: int | None = 1, **overrides):
        self.config = replace(config or GenstConfig(), **overrides)
        self.feature_key = feature_key
        self.trainer_kw = {"accelerator": accelerator, "devices": devices}
        self.num_threads = num_threads

    # -------------------------------------------------------------- inputs
    def _features(self, adata: ad.AnnData, fit: bool = False, extract: bool = False) -> torch.Tensor:
        """(n, D) z-scored, clipped features; checks the encoder and width against the fitted ones."""
        key = self.feature_key
        meta = dict(adata.uns.get("features", {}).get(key, {}) or {})
        if key not in adata.obsm:
            if not (extract and getattr(self, "features_meta_", {}).get("encoder")):
                raise StdistillError(f'no obsm["{key}"]: run stdistill.features.extract(adata, <encoder>) first')
            self._extract(adata)
            meta = dict(adata.uns["features"][key])
        F_ = np.asarray(adata.obsm[key], dtype=np.float32)
        if F_.ndim != 2 or len(F_) != adata.n_obs or not np.isfinite(F_).all():
            raise StdistillError(f'obsm["{key}"] must be finite (n_spots, D) features, got {F_.shape}')
        if fit:
            self.features_meta_ = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
            self.n_features_ = F_.shape[1]
            self.prep_["feat_mean"], self.prep_["feat_sd"] = _zscore_fit(F_)
        else:
            self._check_features(meta, F_.shape[1])
        c = self.config.feature_clip
        return torch.from_numpy(np.clip((F_ - self.prep_["feat_mean"]) / self.prep_["feat_sd"], -c, c))

    def _check_features(self, meta: dict, width: int) -> None:
        saved = getattr(self, "features_meta_", {})
        for k in ("encoder", "size_um", "px"):
            if k in meta and k in saved and meta[k] != saved[k]:
                raise StdistillError(f'obsm["{self.feature_key}"] holds features with {k}={meta[k]!r}; this GenST model '
                                     f'was trained on {k}={saved[k]!r} ({saved.get("encoder")}): extract features with it')
        if width != self.n_features_:
            raise StdistillError(f'obsm["{self.feature_key}"] has {width} features; this GenST model was trained on '
                                 f'{self.n_features_} ({saved.get("encoder", "unknown encoder")}): same encoder?')

    def _extract(self, adata: ad.AnnData) -> None:
        from .. import features

        m = self.features_meta_
        features.extract(adata, m["encoder"], size_um=m.get("size_um", 112.0), px=m.get("px", 224),
                         precision=m.get("precision", "fp32"), key_added=self.feature_key)

    def _expression(self, adata: ad.AnnData, fit: bool = False, layer: str | None = None) -> dict[str, np.ndarray]:
        """Expression inputs ``x`` (n, G + 1) z-scored, raw ``counts`` (n, G), ``y`` (n, G) log1p counts."""
        C, lib = _counts(adata, self.genes_, layer)
        X = _expr_inputs(C, lib)
        Y = np.log1p(C)
        if fit:
            self.prep_["expr_mean"], self.prep_["expr_sd"] = _zscore_fit(X)
            self.prep_["y_mean"], self.prep_["y_sd"] = _zscore_fit(Y)
        return {"x": (X - self.prep_["expr_mean"]) / self.prep_["expr_sd"], "counts": C, "y": Y}

    def _target(self, e: dict[str, np.ndarray]) -> torch.Tensor:
        if self.config.likelihood == "nb":
            return torch.from_numpy(e["counts"])
        return torch.from_numpy((e["y"] - self.prep_["y_mean"]) / self.prep_["y_sd"])

    # -------------------------------------------------------------- training
    def fit(self, adata: ad.AnnData, genes: Sequence[str] | None = None, *, n_genes: int = 50,
            val: ad.AnnData | None = None, layer: str | None = None) -> GenST:
        """Train on ``adata``'s spots (training patients only; raw counts in ``X`` or ``layer``, features
        in ``obsm[feature_key]``).

        ``genes``: the genes to model; ``None``: ``n_genes`` chosen HEST's way on ``adata``'s sections
        (:func:`stdistill.pp.hest_genes`). ``val``: spots of other patients, scored after every
        alignment epoch (mean Pearson of the generated expression) for early stopping and
        :func:`select_genst`; the best epoch is kept. Sets ``curve_`` (validation r, epoch 0 = the
        untrained head) and ``history_`` (losses per epoch).
        """
        with _threads(self.num_threads):
            return self._fit(adata, genes, n_genes, val, layer)

    def _fit(self, adata, genes, n_genes, val, layer) -> GenST:
        from ..pp.genes import hest_genes

        cfg, t0 = self.config, time.time()
        seed_everything(cfg.seed)
        self.genes_ = list(genes) if genes is not None else hest_genes(adata, n_genes, sections=None, layer=layer)
        if len(set(self.genes_)) != len(self.genes_) or not self.genes_:
            raise StdistillError("genes must be a non-empty list without duplicates")
        if val is not None:
            from ..pp.splits import check_patient_disjoint

            check_patient_disjoint(adata, val)
        self.prep_ = {}
        f = self._features(adata, fit=True)
        e = self._expression(adata, fit=True, layer=layer)
        self.net_ = GenstNet(len(self.genes_), self.n_features_, cfg)
        hist = self._fit_expression(e)
        vdata = None
        if val is not None:
            vdata = {"f": self._features(val), "y": torch.from_numpy(self._expression(val, layer=layer)["y"])}
        hist += self._fit_alignment(f, e, vdata)
        self.history_ = pd.DataFrame(hist)
        self.seconds_ = time.time() - t0
        self.net_.eval()
        return self

    def _fit_expression(self, e: dict[str, np.ndarray]) -> list[dict]:
        """Stage 1; the decoder's last bias starts at the genes' mean (log counts for ``nb``)."""
        cfg, net = self.config, self.net_
        x = torch.from_numpy(e["x"].astype(np.float32))
        with torch.no_grad():
            last = net.expr.decoder[-1]
            last.bias.copy_(torch.from_numpy(np.log(e["counts"].mean(0) + 1e-2)) if cfg.likelihood == "nb" else 0.0)
            net.eval()
            net.expr(x)  # k-means init of the codebook on all training spots (no EMA update in eval mode)
        mod = ExprVQModule(net, cfg, x, self._target(e))
        _fit_module(mod, len(x), cfg.expr_epochs, cfg, self.trainer_kw)
        net.eval()
        self.table_ = self._code_table()
        return mod.history

    @torch.no_grad()
    def _code_table(self) -> dict[str, np.ndarray]:
        """Per expression code: ``log1p`` (K, G) generated log1p expression and, for ``nb``, ``log_mu`` (K, G)."""
        out = self.net_.expr.code_table().numpy().astype(np.float64)
        if self.config.likelihood == "nb":
            out = np.minimum(out, 20.0)
            return {"log1p": np.log1p(np.exp(out)), "log_mu": out}
        return {"log1p": out * self.prep_["y_sd"] + self.prep_["y_mean"]}

    def _fit_alignment(self, f: torch.Tensor, e: dict[str, np.ndarray], vdata: dict | None) -> list[dict]:
        """Stage 2 (expression VQ-VAE frozen); the histology codebook is k-means-initialised on all training spots."""
        cfg, net = self.config, self.net_
        with torch.no_grad():
            net.eval()
            out = net.expr(torch.from_numpy(e["x"].astype(np.float32)))
            net.hist(f)
        for p in net.expr.parameters():
            p.requires_grad_(False)
        net.log_theta.requires_grad_(False)
        table = torch.from_numpy(self.table_["log1p"].astype(np.float32))
        self.train_codes_ = out["idx"].numpy()
        mod = AlignModule(net, cfg, {"f": f, "code": out["idx"], "zq": out["zq"]}, table, vdata)
        curve = [generated_pearson(net, vdata["f"], vdata["y"], table)] if vdata else []
        state0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
        _fit_module(mod, len(f), cfg.max_epochs, cfg, self.trainer_kw, val=vdata is not None)
        if mod.best_state is not None:  # keep the best validation epoch (0: the untrained alignment)
            net.load_state_dict(mod.best_state if max(mod.val_scores) > curve[0] else state0)
        self.curve_ = curve + mod.val_scores
        self.best_epoch_ = int(np.argmax(self.curve_)) if self.curve_ else cfg.max_epochs
        rows = mod.history
        if vdata:
            rows = [{"stage": "align", "epoch": 0, "val_r": curve[0]}, *rows]
        return rows

    # -------------------------------------------------------------- generation
    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise StdistillError("GenST is not fitted; call fit() or GenST.load() first")

    @torch.no_grad()
    def code_logits(self, adata: ad.AnnData, extract: bool = False) -> np.ndarray:
        """(n_spots, K) expression-code logits from the histology features alone."""
        self._check_fitted()
        f = self._features(adata, extract=extract)
        self.net_.eval()
        with _threads(self.num_threads):
            return np.concatenate([self.net_.code_logits(f[i:i + 4096])[0].numpy() for i in range(0, len(f), 4096)]
                              or [np.zeros((0, self.net_.expr.codebook_size), np.float32)]).astype(np.float64)

    def predict(self, adata: ad.AnnData, *, key_added: str | None = "genst_pred", sd_key: str | None = "genst_sd",
                temperature: float | None = None, top_k: int | None = None, extract: bool = False) -> pd.DataFrame:
        """Generated expression from H&E features alone (works on tiles with 0 genes).

        Returns the (n_spots x genes) mixture mean ``sum_k p_k log1p(mu_k)`` over the predicted
        expression-code distribution (``temperature``/``top_k``: default the config's), log1p scale.
        Writes it to ``obsm[key_added]`` and the mixture SD (the spread of code samples) to
        ``obsm[sd_key]``, both DataFrames with gene names. ``extract``: compute missing features
        with the encoder the model was trained on.
        """
        cfg = self.config
        P = _tempered(self.code_logits(adata, extract), temperature or cfg.temperature,
                      top_k if top_k is not None else cfg.top_k)
        T = self.table_["log1p"]
        mean = P @ T
        sd = np.sqrt(np.maximum(P @ T ** 2 - mean ** 2, 0.0))
        pred = _frame(mean, adata, self.genes_)
        if key_added:
            adata.obsm[key_added] = pred
        if sd_key:
            adata.obsm[sd_key] = _frame(sd, adata, self.genes_)
        return pred

    def sample(self, adata: ad.AnnData, n_samples: int = 32, *, temperature: float | None = None, top_k: int | None = None,
               counts: bool = False, seed: int = 0, sd_key: str | None = "genst_sd", extract: bool = False) -> np.ndarray:
        """(n_spots, n_samples, genes) log1p expression drawn from the generative model, seeded.

        Each draw picks an expression code from the predicted distribution (``temperature``,
        ``top_k``) and decodes it; ``counts=True`` also draws the counts from the code's negative
        binomial (``likelihood="nb"`` only). The per-spot, per-gene SD over draws goes to ``obsm[sd_key]``.
        """
        cfg = self.config
        if n_samples < 1:
            raise StdistillError(f"n_samples must be >= 1, got {n_samples}")
        if counts and cfg.likelihood != "nb":
            raise StdistillError("counts=True needs a negative-binomial model (likelihood='nb')")
        P = _tempered(self.code_logits(adata, extract), temperature or cfg.temperature,
                      top_k if top_k is not None else cfg.top_k)
        rng = np.random.default_rng(seed)
        u = rng.random((len(P), n_samples, 1))
        idx = np.minimum((P.cumsum(1)[:, None, :] < u).sum(-1), P.shape[1] - 1)  # inverse-CDF draws (n, S)
        if counts:
            mu = np.exp(self.table_["log_mu"][idx])
            theta = np.exp(self.net_.log_theta.detach().numpy().astype(np.float64))
            draws = np.log1p(rng.negative_binomial(theta, theta / (theta + mu))).astype(np.float32)
        else:
            draws = self.table_["log1p"][idx].astype(np.float32)
        if sd_key:
            adata.obsm[sd_key] = _frame(draws.std(1), adata, self.genes_)
        return draws

    # -------------------------------------------------------------- interpretation
    @torch.no_grad()
    def expression_codes(self, adata: ad.AnnData, layer: str | None = None) -> np.ndarray:
        """(n_spots,) expression code of each spot (needs its counts of the model's genes)."""
        self._check_fitted()
        x = torch.from_numpy(self._expression(adata, layer=layer)["x"].astype(np.float32))
        self.net_.eval()
        with _threads(self.num_threads):
            return self.net_.expr(x)["idx"].numpy()

    def reconstruct(self, adata: ad.AnnData, layer: str | None = None) -> pd.DataFrame:
        """(n_spots x genes) log1p expression after expression VQ-VAE encoding, quantisation and
        decoding: the ceiling of any generation through its codes."""
        return _frame(self.table_["log1p"][self.expression_codes(adata, layer)], adata, self.genes_)

    def predictability(self, adata: ad.AnnData, layer: str | None = None) -> pd.DataFrame:
        """Per gene on ``adata`` (held-out spots with counts): Pearson r of generated vs measured
        log1p counts (``generated``) beside the reconstruction's (``reconstruction``, the ceiling);
        best predicted first."""
        y = np.log1p(_counts(adata, self.genes_, layer)[0])
        gen = self.predict(adata, key_added=None, sd_key=None).to_numpy()
        rec = self.reconstruct(adata, layer).to_numpy()
        table = pd.DataFrame({"generated": pearson_per_gene(y, gen, self.genes_),
                              "reconstruction": pearson_per_gene(y, rec, self.genes_)})
        return table.sort_values("generated", ascending=False)

    def codebook_usage(self, adata: ad.AnnData, layer: str | None = None) -> pd.DataFrame:
        """Codebook usage on ``adata`` (rows): ``expression`` (the spots' own codes, needs counts),
        ``histology`` and ``generated`` (argmax of the predicted expression code); columns of
        :func:`codebook_stats` (a collapsed codebook is flagged)."""
        self._check_fitted()
        f = self._features(adata)
        with torch.no_grad():
            self.net_.eval()
            logits, h = self.net_.code_logits(f)
        K = self.net_.expr.codebook_size
        rows = {"histology": codebook_stats(h["idx"].numpy(), self.net_.hist.codebook_size),
                "generated": codebook_stats(logits.argmax(-1).numpy(), K)}
        if adata.n_vars:
            rows = {"expression": codebook_stats(self.expression_codes(adata, layer), K), **rows}
        return pd.DataFrame.from_dict(rows, orient="index")

    # -------------------------------------------------------------- persistence
    def save(self, path) -> Path:
        """Write ``path/config.json`` + ``path/model.safetensors`` (atomically; nothing pickled)."""
        import stdistill

        self._check_fitted()
        tensors = {k: v.detach().clone().contiguous().cpu() for k, v in self.net_.state_dict().items()}
        tensors.update({f"_prep.{k}": torch.from_numpy(np.ascontiguousarray(self.prep_[k])) for k in _PREP})
        meta = {"format": _FORMAT, "stdistill_version": stdistill.__version__, "config": asdict(self.config),
                "genes": self.genes_, "feature_key": self.feature_key, "n_features": self.n_features_,
                "features": self.features_meta_, "curve": [float(x) for x in getattr(self, "curve_", [])]}
        return save_safetensors_dir(path, _WEIGHTS, tensors, meta)

    @classmethod
    def load(cls, path, *, accelerator: str = "cpu", devices="auto", num_threads: int | None = 1) -> GenST:
        """Load a model written by :meth:`save` (safetensors + JSON)."""
        meta, tensors = load_safetensors_dir(path, _WEIGHTS, _FORMAT, "GenST model")
        try:
            cfg = GenstConfig(**meta["config"])
            self = cls(cfg, feature_key=meta["feature_key"], accelerator=accelerator, devices=devices, num_threads=num_threads)
            self.genes_, self.n_features_ = list(meta["genes"]), int(meta["n_features"])
            self.features_meta_ = dict(meta.get("features") or {})
            self.prep_ = {k: tensors.pop(f"_prep.{k}").numpy() for k in _PREP}
            net = GenstNet(len(self.genes_), self.n_features_, cfg)
        except (KeyError, TypeError) as e:
            raise StdistillError(f"GenST model does not match its config: {str(e).splitlines()[0]}", path) from None
        load_state(net, tensors, path, "GenST model")
        self.net_ = net.eval()
        self.curve_ = list(meta.get("curve", []))
        self.table_ = self._code_table()
        return self


# ============================================================================ selection
def select_genst(
    adata: ad.AnnData,
    grid: Sequence[dict],
    *,
    base: GenstConfig | None = None,
    feature_key: str = "X_effnet-lite0-imagenet",
    n_genes: int = 50,
    extra_genes: Sequence[str] = (),
    layer: str | None = None,
    **kw,
) -> tuple[GenstConfig, pd.DataFrame]:
    """Choose GenST settings and alignment epochs by leave-one-patient-out **inside** ``adata`` (a
    fold's training patients) with :func:`stdistill.select.select`: each candidate trains on all but
    one training patient, with ``n_genes`` genes chosen HEST's way on those patients (plus
    ``extra_genes``), and records the mean Pearson of the generated expression on the held-out one
    after each alignment epoch (epoch 0 = untrained alignment). Returns the chosen config and the table.
    """
    from ..pp.genes import hest_genes
    from ..select import select

    base = base or GenstConfig()

    def parts(tr: ad.AnnData, _vp: str, _mask: np.ndarray) -> dict:
        g = hest_genes(tr, n_genes, layer=layer)
        return {"genes": g + [x for x in extra_genes if x not in g and x in tr.var_names]}

    def fit_curve(cfg: GenstConfig, tr: ad.AnnData, va: ad.AnnData, p: dict) -> list[float]:
        return GenST(cfg, feature_key=feature_key, **kw).fit(tr, p["genes"], val=va, layer=layer).curve_

    return select(adata, fit_curve, grid, base, parts=parts)
