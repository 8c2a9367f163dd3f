"""PEKA: parameter-efficient knowledge transfer from a transcriptomic teacher into an image encoder.

The image encoder (``stdistill.encoders.load(...).backbone``) gets a parameter-efficient adapter
from ``peft`` and is trained end to end on spot patches with three losses:

(i) **regression** of the spot's log1p expression of the target genes (z-scored on the training
    spots), MSE, from a linear head on the adapted features;
(ii) **knowledge distillation**: the teacher's embeddings (:class:`~stdistill.teachers.
    ExpressionTeacher`) are clustered into ``n_clusters`` groups by k-means; a classifier fitted
    on the teacher's embeddings gives soft targets; the student's projected embedding goes
    through the same (frozen) classifier and is matched by KL at temperature 2 (x T^2) with a
    hard-label share of 0.5 (:func:`stdistill.losses.distillation_loss`, as PEKA's code);
(iii) **structure alignment**: the within-batch cosine-similarity matrix of the student's
    projected embeddings is matched to the teacher's (:func:`stdistill.losses.structure_alignment`).

Adapters, the cut, the trunk cache and the training loop are shared with the other recipes
(:mod:`stdistill.adapters`); settings are chosen by :func:`stdistill.select.select`. Adapters:
``"miss"`` (peft ``MissConfig``: block-affine, peft's successor of Bone) or ``"lora"``; targets
per architecture from :func:`stdistill.adapters.adapter_targets`.

CPU budget: the frozen part of the network before the cut (``train_from``) is run **once** per
patch and its activations are cached (memory and disk); training then runs only the adapted tail.
The CNN default cuts inside the last block, after its depthwise convolution
(``"blocks.6.0.conv_pwl"``): the tail is ``conv_pwl`` -> ``conv_head`` -> pooling, so epochs are
cheap on a CPU. ``train_from="blocks.5"`` etc. adapts more stages (GPU); ``"input"`` trains from
pixels (no cache). Trained with Lightning (:func:`stdistill._lightning.make_trainer`), so the same
code runs on several GPUs by changing ``accelerator``/``devices``/``strategy``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
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
from ..adapters import (
    AdaptedEncoder,
    AdaptedNet,
    AdapterConfig,
    Tail,
    TailModule,
    ridge_init,
    val_curve,
)

__all__ = ["PEKA", "PekaConfig", "PekaModule", "PekaNet", "choose_peka", "peka", "select_peka"]


# ================================================================================ configuration
@dataclass
class PekaConfig(AdapterConfig):
    """Settings of one PEKA run: the shared adapter settings (:class:`~stdistill.adapters.AdapterConfig`)
    plus the loss weights (regression, KD, structure alignment) and the KD targets."""

    w_reg: float = 1.0
    w_kd: float = 1.0
    w_sa: float = 1.0
    temperature: float = 2.0
    hard_weight: float = 0.5
    n_clusters: int = 16

    def __post_init__(self):
        super().__post_init__()
        for k in ("w_reg", "w_kd", "w_sa"):
            if getattr(self, k) < 0:
                raise StdistillError(f"{k} must be >= 0, got {getattr(self, k)}")


# ================================================================================ model
class PekaNet(AdaptedNet):
    """Adapted tail + heads. ``forward(h)`` -> dict: ``features`` (B, dim), ``pred`` (B, G) z-scored
    gene predictions, ``emb`` (B, D_t) projection, ``logits`` (B, C) of the frozen KD classifier."""

    def __init__(self, tail: Tail, dim: int, n_genes: int, proj_dim: int, cls_w: torch.Tensor, cls_b: torch.Tensor):
        super().__init__(tail, dim, n_genes)
        self.proj = nn.Linear(dim, proj_dim)
        self.register_buffer("cls_w", cls_w.clone())  # frozen teacher classifier (C, D_t)
        self.register_buffer("cls_b", cls_b.clone())

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        f, z = self.standardised(h)
        e = self.proj(z)
        return {"features": f, "pred": self.reg(z), "emb": e, "logits": e @ self.cls_w.T + self.cls_b}


class PekaModule(TailModule):
    """PEKA's losses on the shared tail-training loop: (i) MSE on z-scored genes, (ii) KD of the frozen
    teacher classifier's soft targets, (iii) structure alignment with the teacher embeddings."""

    heads = ("reg.", "proj.")

    def loss_terms(self, out: dict, idx: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        from ..losses import distillation_loss, structure_alignment

        cfg, terms = self.cfg, {}
        if cfg.w_reg:
            terms["reg"] = (cfg.w_reg, F.mse_loss(out["pred"], self.target("y", idx)))
        if cfg.w_kd:
            terms["kd"] = (cfg.w_kd, distillation_loss(out["logits"], self.target("p", idx), cfg.temperature, cfg.hard_weight))
        if cfg.w_sa:
            terms["sa"] = (cfg.w_sa, structure_alignment(out["emb"], self.target("t", idx)))
        return terms


def _with_extra(genes: Sequence[str], extra: Sequence[str], var_names) -> list[str]:
    """``genes`` then the ``extra`` genes not among them; refuses extra genes that were not measured."""
    out = list(genes)
    missing = [g for g in extra if g not in set(var_names)]
    if missing:
        raise StdistillError(f"extra genes {missing} are not among the measured genes (adata.var_names)")
    return out + [g for g in dict.fromkeys(extra) if g not in set(out)]


# ================================================================================ the estimator
class PEKA(AdaptedEncoder):
    """PEKA as an estimator: ``fit`` on training spots (patches + targets + teacher embeddings),
    then ``transform`` (adapted features) or ``predict`` (log1p expression) on any spots with images.

    Parameters are those of :class:`~stdistill.adapters.AdaptedEncoder` with a :class:`PekaConfig`.
    """

    config_class = PekaConfig
    module_class = PekaModule
    _bundle_format = "stdistill.PEKA/1"
    heads = PekaModule.heads
    buffers = ("feat_mu", "feat_sd", "cls_w", "cls_b")
    targets_key = "genes"

    def _targets(self, adata: ad.AnnData, genes: Sequence[str]) -> np.ndarray:
        from ..pp.genes import log1p_targets

        return log1p_targets(adata, genes)

    def _kd_targets(self, T: np.ndarray, kd_reference, kd_classifier) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The frozen KD classifier ``(W (C, D_t), b (C,))`` and its soft targets ``P`` (n, C) on ``T``."""
        from ..teachers.expression import teacher_targets

        if kd_classifier is not None:
            W, b = (np.asarray(x, dtype=np.float32) for x in kd_classifier)
            if W.ndim != 2 or W.shape[1] != T.shape[1] or b.shape != (W.shape[0],):
                raise StdistillError(f"kd_classifier must be (W (C, {T.shape[1]}), b (C,)), got {W.shape}, {b.shape}")
        else:
            ref = T if kd_reference is None else np.asarray(kd_reference, dtype=np.float32)
            W, b, _, _ = teacher_targets(ref, n_clusters=self.config.n_clusters, seed=self.config.seed)
        logits = T @ W.T + b
        P = np.exp(logits - logits.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        return W, b, P

    def fit(
        self,
        adata: ad.AnnData,
        teacher: str | np.ndarray,
        genes: Sequence[str],
        *,
        kd_reference: np.ndarray | None = None,
        kd_classifier: tuple[np.ndarray, np.ndarray] | None = None,
        val: ad.AnnData | None = None,
        extra_genes: Sequence[str] = (),
        run_dir: str | os.PathLike | None = None,
        selection: Selection | None = None,
    ) -> PEKA:
        """Train on ``adata``'s spots (each section with an image).

        Parameters
        ----------
        adata
            Training spots (training patients only) with raw counts.
        teacher
            (n_spots, D_t) teacher embeddings of ``adata``'s spots, or an ``obsm`` key holding them.
        genes
            Target genes (chosen on training sections, e.g. :func:`stdistill.pp.hest_genes`).
        kd_reference
            Teacher embeddings on which k-means and the KD classifier are fitted (e.g. every spot
            of the training patients, with or without image); default: ``teacher``.
        kd_classifier
            Precomputed ``(W, b)`` from :func:`stdistill.teachers.expression.teacher_targets`
            (to share one classifier between runs); default: fitted here on ``kd_reference``.
        val
            Validation spots (a validation patient inside the training folds) for early
            stopping and for choosing settings; ``None``: train ``max_epochs`` epochs.
        extra_genes
            Genes learnt besides ``genes`` (e.g. ``["ERBB2"]`` when the variance-based choice
            left it out), appended in the order given; each must be in ``adata.var_names``.
        run_dir
            Checkpoint folder: Lightning writes a checkpoint every epoch; rerunning the same call
            after a kill resumes there and ends with the same weights as an uninterrupted run
            (``resumed_``: ``"resumed"``, ``"finished"`` or None).
        selection
            The :class:`~stdistill.select.Selection` that chose this config (:func:`select_peka`),
            kept as ``selection_`` and in the saved bundle's training record.
        """
        cfg = self.config
        t0 = time.time()
        self.selection_ = selection
        seed_everything(cfg.seed)
        T = np.asarray(adata.obsm[teacher] if isinstance(teacher, str) else teacher, dtype=np.float32)
        if T.shape[0] != adata.n_obs or T.ndim != 2 or not np.isfinite(T).all():
            raise StdistillError(f"teacher embeddings must be finite (n_spots={adata.n_obs}, D), got {T.shape}")
        if val is not None:
            from ..pp.splits import check_patient_disjoint

            check_patient_disjoint(adata, val)
        self.genes_ = _with_extra(genes, extra_genes, adata.var_names)
        self.training_summary_ = {"n_train_spots": int(adata.n_obs),
                                  "train_sections": sorted(set(adata.obs[Key.obs.section].astype(str))),
                                  "train_patients": sorted(set(adata.obs[Key.obs.patient].astype(str)))}
        Yz = self._standardize_targets(self._targets(adata, self.genes_))
        W, b, P = self._kd_targets(T, kd_reference, kd_classifier)
        self._fit_stain(adata)  # the stain reference (config.stain_norm): a training section
        H = self._activations(adata)
        tail = self._adapted_tail()
        # the projection maps to the teacher's width: the frozen KD classifier reads it
        net = PekaNet(tail, tail.encoder.spec.dim, len(self.genes_), T.shape[1], torch.from_numpy(W), torch.from_numpy(b))
        Z0 = self._init_scaling(net, H)  # heads start at the ridge solution on frozen features (epoch 0 = linear probe)
        ridge_init(net.reg, Z0, torch.from_numpy(Yz), cfg.head_ridge)
        ridge_init(net.proj, Z0, torch.from_numpy(T), cfg.head_ridge)
        data = {"h": H, "y": torch.from_numpy(Yz.astype(np.float32)), "t": torch.from_numpy(T), "p": torch.from_numpy(P.astype(np.float32))}
        vdata = None
        if val is not None:
            Yv = (self._targets(val, self.genes_) - self.y_mean_) / self.y_std_
            vdata = {"h": self._activations(val), "y": torch.from_numpy(Yv.astype(np.float32))}
        self._train(net, data, vdata, t0, run_dir)
        return self

    # -------------------------------------------------------------- inference
    def transform(self, adata: ad.AnnData, key_added: str | None = Key.obsm.peka, *, inplace: bool = True,
                  copy: bool = False) -> ad.AnnData | np.ndarray | None:
        """Adapted-encoder features (n_spots, dim) float32 into ``obsm[key_added]``. Returns None
        (``copy=True``: a new AnnData with them; ``inplace=False``: the array, nothing written)."""
        return write_obsm(adata, self._features_out(adata), key_added, inplace=inplace, copy=copy, where="PEKA.transform")

    def predict(self, adata: ad.AnnData, key_added: str | None = Key.obsm.peka_pred, *, inplace: bool = True,
                copy: bool = False) -> ad.AnnData | pd.DataFrame | None:
        """Predicted log1p expression from the regression head (DataFrame n_spots x genes) into
        ``obsm[key_added]``. Returns None (``copy=True``: a new AnnData; ``inplace=False``: the frame).

        .. versionchanged:: writes ``obsm["peka_pred"]`` and returns None (it returned the frame and
           wrote nothing); ``inplace=False`` gives the frame."""
        return write_obsm(adata, self._predict_frame(adata), key_added, inplace=inplace, copy=copy, where="PEKA.predict")

    def _net_from_state(self, tail: Tail, state: dict[str, torch.Tensor]) -> PekaNet:
        return PekaNet(tail, tail.encoder.spec.dim, len(self.genes_), state["proj.weight"].shape[0], state["cls_w"], state["cls_b"])


# ================================================================================ recipe functions
def peka(
    adata: ad.AnnData,
    teacher: str | np.ndarray,
    genes: Sequence[str],
    *,
    train_sections: Sequence[str] | None = None,
    val_sections: Sequence[str] | None = None,
    kd_reference: np.ndarray | None = None,
    encoder="effnet-lite0-imagenet",
    config: PekaConfig | None = None,
    key_added: str | None = Key.obsm.peka,
    extra_genes: Sequence[str] = (),
    run_dir: str | os.PathLike | None = None,
    **kw,
) -> PEKA:
    """Fit PEKA on ``train_sections`` (early stopping on ``val_sections``, which must be other
    patients), then write adapted features of **every** spot to ``obsm[key_added]``.

    ``teacher``: an ``obsm`` key or (n_obs, D_t) array (rows of non-training spots are ignored).
    ``extra_genes``, ``run_dir``: see :meth:`PEKA.fit`. Returns the fitted :class:`PEKA`.
    """
    from ..pp.splits import train_val_sections

    tr, va, mtr = train_val_sections(adata, train_sections, val_sections)
    T = np.asarray(adata.obsm[teacher] if isinstance(teacher, str) else teacher, dtype=np.float32)
    model = PEKA(encoder, config, **kw).fit(tr, T[mtr], genes, kd_reference=kd_reference, val=va,
                                                  extra_genes=extra_genes, run_dir=run_dir)
    if key_added:
        model.transform(adata, key_added=key_added)
    return model


def select_peka(
    adata: ad.AnnData,
    teacher: np.ndarray,
    genes: Sequence[str],
    grid: Sequence[dict],
    *,
    base: PekaConfig | None = None,
    kd_reference: np.ndarray | None = None,
    inner: Callable[[ad.AnnData, str], dict] | None = None,
    encoder="effnet-lite0-imagenet",
    **kw,
) -> Selection:
    """Choose PEKA's settings and epochs by leave-one-patient-out **inside** ``adata`` (a fold's
    training patients) with :func:`stdistill.select.select`.

    Each candidate (``base`` updated with one ``grid`` dict) is trained for ``base.max_epochs``
    epochs on every inner split, recording the ``base.val_metric`` score after each epoch (epoch 0
    = the frozen encoder); the best (candidate, epoch) of the curves averaged over the inner splits
    wins. Epoch 0 wins when no adaptation beats the frozen encoder.

    Parameters
    ----------
    teacher
        (n_obs, D_t) teacher embeddings of ``adata``'s spots.
    inner
        Optional ``inner(inner_train, val_patient) -> dict`` re-deriving, without the validation
        patient, any of ``"teacher"`` (embeddings of ``inner_train``'s spots), ``"genes"`` and
        ``"kd_classifier"`` (the strict way: then nothing about the validation patient reaches
        training). Default: ``teacher`` rows and ``genes`` as given.
    kw
        Passed to :class:`PEKA` (``cache_dir``, ``device``, ...).

    Returns
    -------
    A :class:`~stdistill.select.Selection`: ``.config()`` is the chosen config (``max_epochs`` =
    chosen epochs), ``.table`` the curves. (Unpacking it as ``(config, table)`` is deprecated.)
    """
    T = np.asarray(teacher)

    def parts(s) -> dict:
        return {"teacher": T[s.train_rows], "genes": list(genes), "kd_classifier": None,
                **(inner(s.train, s.name) if inner is not None else {})}

    def fit_score(cfg: PekaConfig, s) -> list[float]:
        model = PEKA(encoder, cfg, **kw).fit(s.train, s.parts["teacher"], s.parts["genes"], kd_reference=kd_reference,
                                             kd_classifier=s.parts["kd_classifier"], val=s.val)
        return val_curve(model.history_, cfg.val_metric)

    return select(adata, fit_score, grid, base=base or PekaConfig(), parts=parts, full_curves=True)


def choose_peka(table: pd.DataFrame, grid: Sequence[dict], base: PekaConfig | None = None,
                where: Callable[[dict], bool] | None = None) -> PekaConfig:
    """The best (candidate, epoch) of :func:`select_peka`'s table among the candidates passing
    ``where`` (:func:`stdistill.select.choose`)."""
    from ..select import choose

    return choose(table, grid, base or PekaConfig(), where=where)
