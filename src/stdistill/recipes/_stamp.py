"""STAMP: pathway activities of the spots aligned into an image encoder with parameter-efficient fine-tuning.

Spot transcriptomes are noisy; STAMP (the paper "Spatial Transcriptomics-Guided Alignment Enhances
Molecular Profiling in Pathology Foundation Model") aggregates them into pathway activities and
aligns the encoder to those. Here the activities come from :func:`stdistill.pp.pathway_scores`
(MSigDB Hallmark or PROGENy, decoupler's ULM per spot, per section standardised). The encoder
(any registered timm ViT or EfficientNet) gets a peft adapter after a cut and trains on cached
trunk activations (:mod:`stdistill.adapters`, shared with PEKA), with two losses, our reading of
the paper's "pathway-informed alignment" (its abstract names no loss):

(i) **regression**: a linear head on the adapted features predicts the spot's pathway
    activities (z-scored on the training spots), MSE;
(ii) **contrastive alignment**: symmetric InfoNCE (:func:`stdistill.losses.info_nce`) between a
    projection of the image features and an embedding of the spot's pathway profile (a small
    MLP), with a learned or fixed temperature.

Outputs: aligned features ``obsm["X_stamp"]`` and predicted activities ``obsm["pathway_pred"]``.
Weights, rank and epochs are chosen on validation patients inside the training folds
(:func:`select_stamp`, the shared :func:`stdistill.select.select`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .._api import write_obsm
from .._errors import StdistillError
from .._keys import Key
from .._utils import seed_everything
from ..select import Selection, select
from ..adapters import AdaptedEncoder, AdaptedNet, AdapterConfig, Tail, TailModule, ridge_init, val_curve

__all__ = ["STAMP", "StampConfig", "StampModule", "StampNet", "pathway_targets", "select_stamp", "stamp"]


@dataclass
class StampConfig(AdapterConfig):
    """Settings of one STAMP run: the shared adapter settings plus the two loss weights and the
    contrastive head (``proj_dim``-wide embeddings, InfoNCE ``temperature``, learned or fixed)."""

    w_reg: float = 1.0
    w_con: float = 1.0
    temperature: float = 0.1
    learn_temperature: bool = True
    proj_dim: int = 64

    def __post_init__(self):
        super().__post_init__()
        for k in ("w_reg", "w_con"):
            if getattr(self, k) < 0:
                raise StdistillError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.temperature <= 0:
            raise StdistillError(f"temperature must be > 0, got {self.temperature}")


class StampNet(AdaptedNet):
    """Adapted tail + heads. ``forward(h)`` -> dict: ``features`` (B, dim), ``pred`` (B, P) z-scored
    pathway activities, ``emb`` (B, proj_dim) image embedding; :meth:`embed_pathways` maps (B, P)
    z-scored activities to (B, proj_dim)."""

    def __init__(self, tail: Tail, dim: int, n_pathways: int, proj_dim: int, temperature: float, learn_temperature: bool):
        super().__init__(tail, dim, n_pathways)
        self.img_proj = nn.Linear(dim, proj_dim)
        self.path_enc = nn.Sequential(nn.Linear(n_pathways, proj_dim), nn.GELU(), nn.Linear(proj_dim, proj_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        f, z = self.standardised(h)
        return {"features": f, "pred": self.reg(z), "emb": self.img_proj(z)}

    def embed_pathways(self, y: torch.Tensor) -> torch.Tensor:
        return self.path_enc(y)


class StampModule(TailModule):
    """STAMP's losses on the shared tail-training loop: MSE on z-scored pathway activities and
    InfoNCE between image and pathway-profile embeddings."""

    heads = ("reg.", "img_proj.", "path_enc.", "logit_scale")

    def loss_terms(self, out: dict, idx: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        from ..losses import info_nce

        cfg, y, terms = self.cfg, self.target("y", idx), {}
        if cfg.w_reg:
            terms["reg"] = (cfg.w_reg, F.mse_loss(out["pred"], y))
        if cfg.w_con:
            terms["con"] = (cfg.w_con, info_nce(out["emb"], self.net.embed_pathways(y), self.net.logit_scale))
        return terms


def pathway_targets(adata: ad.AnnData, pathways: str | pd.DataFrame | np.ndarray, names: Sequence[str] | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """(n_spots, P) float64 pathway activities and their names from an ``obsm`` key (a DataFrame, as
    :func:`stdistill.pp.pathway_scores` writes, or an array with ``names``), a DataFrame or an array;
    with ``names``, the columns are taken in that order."""
    if isinstance(pathways, str) and pathways not in adata.obsm:
        raise StdistillError(f'no obsm["{pathways}"]: run stdistill.pp.pathway_scores first')
    v = adata.obsm[pathways] if isinstance(pathways, str) else pathways
    if isinstance(v, pd.DataFrame):
        cols = [str(c) for c in v.columns]
        if names is not None:
            missing = [n for n in names if n not in cols]
            if missing:
                raise StdistillError(f"pathway activities lack {missing[:3]} ({len(missing)} missing)")
            v = v[list(names)]
        Y, got = v.to_numpy(dtype=np.float64), list(names or cols)
    else:
        Y = np.asarray(v, dtype=np.float64)
        got = list(names) if names is not None else [f"pathway{i}" for i in range(Y.shape[1] if Y.ndim == 2 else 0)]
    if Y.ndim != 2 or Y.shape != (adata.n_obs, len(got)) or not np.isfinite(Y).all():
        raise StdistillError(f"pathway activities must be finite (n_spots={adata.n_obs}, {len(got)}), got {Y.shape}")
    return Y, got


class STAMP(AdaptedEncoder):
    """STAMP as an estimator: ``fit`` on training spots (patches + pathway activities), then
    ``transform`` (aligned features) or ``predict`` (pathway activities) on any spots or tiles with
    an image, no expression needed.

    Parameters are those of :class:`~stdistill.adapters.AdaptedEncoder` with a :class:`StampConfig`.
    """

    config_class = StampConfig
    module_class = StampModule
    _bundle_format = "stdistill.STAMP/1"
    heads = StampModule.heads
    targets_key = "pathways"

    def fit(self, adata: ad.AnnData, pathways: str | pd.DataFrame | np.ndarray = Key.obsm.pathway_scores, *,
            names: Sequence[str] | None = None, val: ad.AnnData | None = None,
            run_dir: str | os.PathLike | None = None, selection: Selection | None = None) -> STAMP:
        """Train on ``adata``'s spots (training patients only, each section with an image).

        Parameters
        ----------
        pathways
            Pathway activities of ``adata``'s spots (see :func:`pathway_targets`); ``val`` must
            hold the same under the same ``obsm`` key (a key is needed when ``val`` is given).
        val
            Validation spots (another patient inside the training folds) for early stopping and
            choosing settings; ``None``: train ``max_epochs`` epochs.
        run_dir
            Checkpoint folder: Lightning writes a checkpoint every epoch; rerunning the same call
            after a kill resumes there and ends with the same weights as an uninterrupted run
            (``resumed_``: ``"resumed"``, ``"finished"`` or None).
        selection
            The :class:`~stdistill.select.Selection` that chose this config (:func:`select_stamp`),
            kept as ``selection_`` and in the saved bundle's training record.
        """
        cfg, t0 = self.config, time.time()
        self.selection_ = selection
        seed_everything(cfg.seed)
        Y, self.pathways_ = pathway_targets(adata, pathways, names)
        if val is not None:
            from ..pp.splits import check_patient_disjoint

            if not isinstance(pathways, str):
                raise StdistillError("with val=, give the pathway activities as an obsm key present in both")
            check_patient_disjoint(adata, val)
        Yz = self._standardize_targets(Y)
        self._fit_stain(adata)  # the stain reference (config.stain_norm): a training section
        H = self._activations(adata)
        tail = self._adapted_tail()
        net = StampNet(tail, tail.encoder.spec.dim, len(self.pathways_), cfg.proj_dim, cfg.temperature, cfg.learn_temperature)
        Z0 = self._init_scaling(net, H)  # epoch 0 = the frozen encoder with a ridge head
        ridge_init(net.reg, Z0, torch.from_numpy(Yz), cfg.head_ridge)
        data = {"h": H, "y": torch.from_numpy(Yz.astype(np.float32))}
        vdata = None
        if val is not None:
            Yv = (pathway_targets(val, pathways, self.pathways_)[0] - self.y_mean_) / self.y_std_
            vdata = {"h": self._activations(val), "y": torch.from_numpy(Yv.astype(np.float32))}
        self._train(net, data, vdata, t0, run_dir)
        return self

    def transform(self, adata: ad.AnnData, key_added: str | None = Key.obsm.stamp, *, inplace: bool = True,
                  copy: bool = False) -> ad.AnnData | np.ndarray | None:
        """Aligned features (n_spots, dim) float32 into ``obsm[key_added]``. Returns None
        (``copy=True``: a new AnnData with them; ``inplace=False``: the array, nothing written)."""
        return write_obsm(adata, self._features_out(adata), key_added, inplace=inplace, copy=copy, where="STAMP.transform")

    def predict(self, adata: ad.AnnData, key_added: str | None = Key.obsm.pathway_pred, *, inplace: bool = True,
                copy: bool = False) -> ad.AnnData | pd.DataFrame | None:
        """Predicted activities (DataFrame n_spots x pathways, the training targets' scale) into
        ``obsm[key_added]``. Returns None (``copy=True``: a new AnnData; ``inplace=False``: the frame).

        .. versionchanged:: writes ``obsm["pathway_pred"]`` by default and returns None (it returned the
           frame and wrote only with ``key_added``); ``inplace=False`` gives the frame."""
        return write_obsm(adata, self._predict_frame(adata), key_added, inplace=inplace, copy=copy, where="STAMP.predict")

    def _net_from_state(self, tail: Tail, state: dict[str, torch.Tensor]) -> StampNet:
        cfg = self.config
        return StampNet(tail, tail.encoder.spec.dim, len(self.pathways_), cfg.proj_dim, cfg.temperature, cfg.learn_temperature)


def stamp(
    adata: ad.AnnData,
    pathways: str = Key.obsm.pathway_scores,
    *,
    train_sections: Sequence[str] | None = None,
    val_sections: Sequence[str] | None = None,
    encoder="effnet-lite0-imagenet",
    config: StampConfig | None = None,
    key_added: str | None = Key.obsm.stamp,
    pred_key: str | None = Key.obsm.pathway_pred,
    run_dir: str | os.PathLike | None = None,
    **kw,
) -> STAMP:
    """Fit STAMP on ``train_sections`` (early stopping on ``val_sections``, other patients) against
    ``obsm[pathways]``, then write for **every** spot the aligned features ``obsm[key_added]``
    (n, dim) and the predicted activities ``obsm[pred_key]`` (a DataFrame, n x pathways).

    ``run_dir``: checkpoint folder to resume from after a kill (see :meth:`STAMP.fit`).
    Returns the fitted :class:`STAMP`.
    """
    from ..pp.splits import train_val_sections

    tr, va, _ = train_val_sections(adata, train_sections, val_sections)
    model = STAMP(encoder, config, **kw).fit(tr, pathways, val=va, run_dir=run_dir)
    if key_added:
        model.transform(adata, key_added=key_added)
    if pred_key:
        model.predict(adata, key_added=pred_key)
    return model


def select_stamp(
    adata: ad.AnnData,
    grid: Sequence[dict],
    *,
    pathways: str = Key.obsm.pathway_scores,
    base: StampConfig | None = None,
    encoder="effnet-lite0-imagenet",
    **kw,
) -> Selection:
    """Choose STAMP's loss weights, rank, learning rate and epochs by leave-one-patient-out **inside**
    ``adata`` (a fold's training patients), with :func:`stdistill.select.select`: every candidate
    trains on all but one training patient and records the ``base.val_metric`` score on the held-out
    one after each epoch (epoch 0 = the frozen encoder with a ridge head).

    Pathway activities are per-spot statistics (per-section standardised), so nothing about the
    validation patient reaches training through them. Returns a :class:`~stdistill.select.Selection`
    (``.config()``: the chosen config; unpacking it as ``(config, table)`` is deprecated).
    """

    def fit_score(cfg: StampConfig, s) -> list[float]:
        return val_curve(STAMP(encoder, cfg, **kw).fit(s.train, pathways, val=s.val).history_, cfg.val_metric)

    return select(adata, fit_score, grid, base=base or StampConfig(), full_curves=True)
