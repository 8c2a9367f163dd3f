"""The histology-only niche student: a small transformer over a spot's patch features and its
neighbours' patch features within a radius (um), distilled from a niche teacher's soft labels.

Tokens: the centre patch and its neighbours (up to ``max_neighbors``, nearest first), each
``LayerNorm -> Linear`` of its patch feature plus a learned encoding of its offset from the
centre (an MLP of (dx, dy) / radius, so any spot pitch or tile grid works) and, for the centre,
a learned centre embedding. A transformer encoder mixes them; the centre token's output gives K
logits. Loss: :func:`stdistill.losses.distillation_loss` (temperature-scaled KL x T^2, plus an
optional hard cross-entropy share). Training augments with random rotations/flips of the offsets
(tissue orientation is arbitrary) and neighbour-token dropout.

Early stopping uses a validation patient taken from the training patients (never the test
fold); with a single training patient it warns and holds out a contiguous spatial block of each
training section instead. With ``refit=True`` the model is then retrained on all training spots
for the chosen number of epochs. With ``views=True`` each training epoch draws every spot's
feature from its clean and augmented views (``obsm[feature_key + "_views"]``, from
``features.extract(views=K)``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._json import jsonable as _jsonable
from .._moments import section_moments
from .._niches import niche_names, write_niches
from .._pca import finite_rows, fit_pca_auto, project, standardized_blocks
from .._threads import torch_threads as _threads
from .._utils import load_state, seed_everything
from ..bundle._format import bundle_record, check_record
from ..bundle._io import Bundled
from ..io._section import PATIENT_KEY, SECTION_KEY
from ..pp.neighbors import N_NEIGHBORS, neighbor_tokens, radius_for_neighbors
from ._refine import DEFAULT_REFINE_GRID

_FORMAT = "stdistill.NicheStudent/1"
FEATURE_NORMS = ("section", "global")
_ARRAYS = ("feat_mean", "feat_sd", "pca_mean", "pca_components", "ctx_feat_mean", "ctx_feat_sd", "ctx_pca_mean",
           "ctx_pca_components")


def _net(d_feat: int, n_niches: int, d_model: int, n_layers: int, n_heads: int, dropout: float, summary_token: bool = True):
    from ._niche_modules import NicheTransformer

    return NicheTransformer(d_feat, n_niches, d_model, n_layers, n_heads, dropout, summary_token)


def _stage_dir(run_dir: str | os.PathLike, stage: str, params: dict, seed: int, epochs: int, arrays, *idx) -> Path:
    """The checkpoint folder of one training stage (:func:`stdistill._resume.stage_dir`): the
    fingerprint covers the settings, seed, epochs, inputs and the training/validation rows."""
    from .._resume import stage_dir

    keep = {k: v for k, v in params.items() if k not in ("device", "num_threads")}
    return stage_dir(run_dir, stage, [keep, seed, epochs], (*arrays[:5], *idx))


def _norm_parts(adata: ad.AnnData, f: np.ndarray, ok: np.ndarray, how: str, mean=None, sd=None) -> list:
    """(rows, mean (F,), sd (F,)) of each group of rows z-scored together (see :func:`normalise_features`)."""
    if how == "section":
        return [(np.flatnonzero(m), mu, s_) for m, mu, s_ in section_moments(adata, f, ok)]
    if how == "global":
        if mean is None:
            mean, sd = f[ok].mean(0), f[ok].std(0)
            sd[sd < 1e-6] = 1.0
        return [(np.flatnonzero(ok), mean, sd)]
    raise StdistillError(f"feature normalisation must be one of {FEATURE_NORMS}, got {how!r}")


def normalise_features(adata: ad.AnnData, f: np.ndarray, how: str = "section", mean=None, sd=None):
    """Z-scored features (clipped to +-10) and a (n_obs,) mask of rows with finite features
    (other rows are 0).

    ``how="section"``: within each section (uses only that section's images, no labels);
    ``"global"``: with the given ``mean``/``sd`` (training statistics), or this data's own.
    """
    f = np.asarray(f, dtype=np.float32)
    ok = finite_rows(f)
    out = np.zeros_like(f)  # the one (n_obs, F) float32 result, filled one block of rows at a time
    for rows, z in standardized_blocks(f, _norm_parts(adata, f, ok, how, mean, sd)):
        out[rows] = z
    return out, ok


class NicheStudent(Bundled):
    """H&E-only niche model distilled from a teacher's soft labels (scikit-learn style).

    Parameters
    ----------
    n_niches
        K; ``None``: taken from the teacher probabilities at :meth:`fit`.
    feature_key
        ``obsm`` key of per-spot patch features (n_obs, F), e.g. ``"X_effnet-lite0-imagenet"``.
    radius_um
        Neighbourhood radius in um (0: the centre patch only). ``None`` (default): the radius
        holding ``n_neighbors`` spots around the median training spot (18: about 400 um, the two
        nearest rings, on a legacy ST array; about 200 um on Visium); it is then fixed in um and
        reused at prediction (e.g. on a tile grid).
    n_neighbors
        Neighbour count defining the automatic radius.
    max_neighbors
        Token budget besides the centre; ``None``: the largest neighbour count seen in training
        (at most 48).
    temperature, hard_weight
        KD temperature T (the KL is scaled by T^2) and the hard cross-entropy share.
    feature_norm
        ``"section"``: z-score features within each section (stain/scanner shifts; uses only the
        section's own images, no labels); ``"global"``: z-score with the training mean/sd.
    n_pcs
        Project the normalised features on their first ``n_pcs`` principal components (fitted on
        the training spots) before the transformer; ``None``: use them whole.
    val_patients
        Early-stopping patients drawn from the training data: ``"smallest"`` (default: the
        training patient with the fewest spots; with one training patient a spatial block, see
        ``val_block``), a list of patient ids, or ``None`` (no early stopping: ``max_epochs``).
        ``"each"``: as ``"smallest"``, but ``fit(candidates=...)`` scores every candidate with
        each training patient validating in turn (a model trained on the others) and chooses by
        the mean score (more fits; one patient's verdict is noisy with few patients).
    val_block
        With ``val_patients="smallest"`` and a single training patient: the share of each
        training section's spots held out for early stopping, as one contiguous band along the
        section's longer axis (a warning says so). 0: no early stopping (also warned).
    views
        Train on augmented feature views: each epoch every spot's feature is drawn from its
        clean feature and ``obsm[feature_key + "_views"]`` (n_obs, V, F), seeded by (seed, epoch).
        Validation and prediction use the clean features.
    context_key
        ``obsm`` key of features of a larger field of view around each spot (n_obs, F), e.g.
        ``features.extract(adata, size_um=224, key_added="X_<enc>_ctx224")`` (2x the patch, resized
        to the encoder's input; cached like any features). Normalised and projected like the
        patch features (own statistics and PCA) and given to the transformer as one extra token
        per spot (offset 0, without the centre embedding). ``None``: no context token.
    refine_grid
        Test-time refinements (:func:`stdistill.students.refine_niches` settings, e.g.
        ``{"method": "gmm", "weight": 1.0}``; ``{"method": "none"}``: none) tried on the
        validation patient (or block) after early stopping, with the model that did not train on
        it; the best by ARI against the teacher (ties: the earlier) is kept in
        ``info_["refine"]`` (scores: ``info_["refine_selection"]``) and used by
        ``predict(refine="auto")``. ``None``: ``DEFAULT_REFINE_GRID`` ("none" first); ``[]``: no
        choice (``"auto"`` then means no refinement). Never chosen on the test patient.
    refit
        After early stopping, retrain on all training patients for the chosen number of epochs
        (at least ``min_epochs``).
    monitor
        Early-stopping (and ``candidates``) score on the validation patient: ``"val_ari"``
        (default: ARI of the argmax against the teacher's; identity-free like the headline metric),
        ``"val_err"`` (niche-id error, ties broken by the loss) or ``"val_loss"`` (the KD loss).
        On HER2ST the KD loss is lowest for a barely trained, near-uniform model, and niche
        identities of one patient transfer so badly to another that the error is worse than
        chance on the inner validation pairs, while their ARI still peaks after several epochs.
    num_threads
        torch CPU threads while training (restored afterwards); 1 is fastest for this small
        model on a busy 2-core machine. ``None``: leave torch's setting.
    encoder, size_um, px
        How the features were made (for :meth:`predict` on data without features; ``encoder``
        defaults to ``feature_key`` without its ``"X_"``).
    """

    def __init__(
        self,
        n_niches: int | None = None,
        *,
        feature_key: str = "X_effnet-lite0-imagenet",
        radius_um: float | None = None,
        n_neighbors: int = N_NEIGHBORS,
        max_neighbors: int | None = None,
        d_model: int = 32,
        n_layers: int = 2,
        summary_token: bool = True,
        n_heads: int = 4,
        dropout: float = 0.1,
        token_drop: float = 0.1,
        temperature: float = 2.0,
        hard_weight: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        batch_size: int = 128,
        max_epochs: int = 60,
        min_epochs: int = 3,
        patience: int = 8,
        monitor: str = "val_ari",
        feature_norm: str = "section",
        n_pcs: int | None = 64,
        val_patients: str | list[str] | None = "smallest",
        val_block: float = 0.2,
        views: bool = False,
        context_key: str | None = None,
        refine_grid: list[dict] | None = None,
        refit: bool = True,
        encoder: str | None = None,
        size_um: float = 112.0,
        px: int = 224,
        seed: int = 0,
        device: str = "cpu",
        num_threads: int | None = 1,
    ):
        if feature_norm not in FEATURE_NORMS:
            raise StdistillError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        if radius_um is not None and radius_um < 0:
            raise StdistillError(f"radius_um must be >= 0 (micrometres), got {radius_um}")
        if temperature <= 0:
            raise StdistillError(f"temperature must be > 0, got {temperature}")
        if not 0 <= hard_weight <= 1:
            raise StdistillError(f"hard_weight must be in [0, 1], got {hard_weight}")
        if monitor not in ("val_err", "val_loss", "val_ari"):
            raise StdistillError(f'monitor must be "val_err" (niche-id error), "val_ari" or "val_loss" (KD loss), got {monitor!r}')
        if d_model % n_heads:
            raise StdistillError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if encoder is None and feature_key.startswith("X_"):
            encoder = feature_key[2:]
        self.params = dict(
            n_niches=n_niches, feature_key=feature_key, radius_um=None if radius_um is None else float(radius_um),
            n_neighbors=int(n_neighbors), max_neighbors=max_neighbors,
            d_model=int(d_model), n_layers=int(n_layers), summary_token=bool(summary_token), n_heads=int(n_heads), dropout=float(dropout),
            token_drop=float(token_drop), temperature=float(temperature), hard_weight=float(hard_weight),
            lr=float(lr), weight_decay=float(weight_decay), batch_size=int(batch_size), max_epochs=int(max_epochs),
            min_epochs=int(min_epochs), monitor=monitor, patience=int(patience), feature_norm=feature_norm,
            n_pcs=None if n_pcs is None else int(n_pcs), val_patients=val_patients, val_block=float(val_block),
            views=bool(views), refit=bool(refit), context_key=context_key,
            refine_grid=[dict(g) for g in (DEFAULT_REFINE_GRID if refine_grid is None else refine_grid)],
            encoder=encoder, size_um=float(size_um), px=int(px), seed=int(seed), device=device,
            num_threads=num_threads,
        )
        self.net_ = None
        self.info_: dict = {}

    def __repr__(self) -> str:
        p = self.params
        return f"NicheStudent(n_niches={p['n_niches']}, feature_key={p['feature_key']!r}, radius_um={p['radius_um']})"

    # ------------------------------------------------------------------ inputs
    def feature_record(self, context: bool = False) -> dict:
        """How the training features (or, ``context=True``, the context features) were made: their
        ``uns["features"]`` record at fit (encoder, size_um, px, precision, stain state); for
        models saved before records were kept, the patch settings of the parameters."""
        p = self.params
        rec = self.info_.get("context_features" if context else "features")
        if rec:
            return rec
        if context:
            raise StdistillError(f'the model does not record how its context features (obsm["{p["context_key"]}"]) were '
                                 "made; pass them in obsm, or retrain it with this version")
        return {"encoder": p["encoder"], "size_um": p["size_um"], "px": p["px"]}

    def _extract_missing(self, adata: ad.AnnData, key: str, what: str) -> None:
        """Extract ``obsm[key]`` as the training features were made (encoder, patch, precision,
        stain normalisation onto the stored reference), through the feature cache."""
        from ..features import extract, extraction_kwargs

        made = self.feature_record(context=what == "context_features")
        if made.get("encoder"):
            extract(adata, key_added=key, **extraction_kwargs(made))

    def _check_stain(self, adata: ad.AnnData, key: str, what: str) -> None:
        """Refuse ``obsm[key]`` whose record names another stain normalisation than training's."""
        from ..pp._stain import round_estimate

        made = adata.uns.get("features", {}).get(key)
        if not made or not self.info_.get(what):
            return

        def desc(rec):
            st = rec.get("stain") or {}
            return (st.get("method"), round_estimate(st["reference"]) if st.get("reference") is not None else None)

        want, got = desc(self.info_[what]), desc(made)
        if want != got:
            raise StdistillError(f'obsm["{key}"] was made with stain normalisation {got[0] or "none"} but the student was '
                                 f'trained on {want[0] or "none"} (with its stored reference); drop obsm["{key}"] and '
                                 "predict with extract=True to make them as in training")

    def _features(self, adata: ad.AnnData, extract: bool = False) -> np.ndarray:
        key = self.params["feature_key"]
        if key not in adata.obsm:
            if extract:
                self._extract_missing(adata, key, "features")
            if key not in adata.obsm:
                raise StdistillError(
                    f'AnnData has no obsm["{key}"] (patch features); run stdistill.features.extract(adata, '
                    f'encoder="{self.params["encoder"]}") first'
                )
        f = adata.obsm[key]
        f = np.asarray(f.to_numpy() if isinstance(f, pd.DataFrame) else f, dtype=np.float32)
        if f.ndim != 2 or f.shape[0] != adata.n_obs:
            raise StdistillError(f'obsm["{key}"] must be (n_obs, n_features), got {f.shape}')
        if self.net_ is not None and self.info_.get("features"):
            check_record(self.bundle_record(), adata.uns.get("features", {}).get(key), f'obsm["{key}"]')
            self._check_stain(adata, key, "features")
        if self.net_ is not None and f.shape[1] != self.info_["d_feat"]:
            raise StdistillError(
                f'obsm["{key}"] has {f.shape[1]} features but the student was trained on {self.info_["d_feat"]}: same encoder?'
            )
        return f

    def _normalise(self, adata: ad.AnnData, f: np.ndarray, fit: bool, stats=None):
        """Normalised (and PCA-projected) features (n_obs, d) and the mask of rows with features.

        ``stats``: (mean, sd) of the section the rows come from, for "section" normalisation of a
        part of a section (a chunk of a slide); ignored with "global" normalisation."""
        if self.params["feature_norm"] == "global" and fit:
            ok = finite_rows(f)
            fo = f if ok.all() else f[ok]
            self.info_["feat_mean"] = fo.mean(0)
            sd = fo.std(0)
            sd[sd < 1e-6] = 1.0
            self.info_["feat_sd"] = sd
        how, mean, sd = self.params["feature_norm"], self.info_.get("feat_mean"), self.info_.get("feat_sd")
        if stats is not None and how == "section" and not fit:
            how, (mean, sd) = "global", stats
        k = self.params["n_pcs"]
        if fit:
            self.info_.pop("pca_components", None)
        if not fit and "pca_components" not in self.info_ or fit and (k is None or k >= f.shape[1]):
            return normalise_features(adata, f, how, mean, sd)
        # PCA: stream each section's normalised rows twice (fit, project), never a full (n, F) copy
        ok = finite_rows(f)
        parts = _norm_parts(adata, f, ok, how, mean, sd)
        if fit:
            if ok.sum() <= k:
                return normalise_features(adata, f, how, mean, sd)
            self.info_["pca_mean"], self.info_["pca_components"] = fit_pca_auto(
                lambda: standardized_blocks(f, parts), *f.shape, k, seed=self.params["seed"])
        z = project(standardized_blocks(f, parts), self.info_["pca_mean"], self.info_["pca_components"], len(f))
        return z, ok

    def _tokens(self, adata: ad.AnnData, ok: np.ndarray, max_neighbors: int | None):
        r = self.info_["radius_um"]
        tok = neighbor_tokens(adata, r, max_neighbors=max_neighbors, valid=ok)
        r = r or 1.0
        return tok.index, (tok.offset_um / r).astype(np.float32), tok.mask

    # ------------------------------------------------------------------ fit
    def _prepare(self, adata: ad.AnnData, probs: np.ndarray):
        """Inputs for training under the current params: features, tokens, soft labels, mask."""
        p = self.params
        f = self._features(adata)
        self.info_ = {"d_feat": int(f.shape[1])}
        f, ok = self._normalise(adata, f, fit=True)
        ok &= np.all(np.isfinite(probs), axis=1)
        if ok.sum() < 2:
            raise StdistillError("fewer than 2 spots have both patch features and teacher probabilities")
        probs = np.where(ok[:, None], probs, 1.0 / p["n_niches"])
        probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
        r = p["radius_um"]
        self.info_["radius_um"] = float(radius_for_neighbors(adata, p["n_neighbors"], mask=ok) if r is None else r)
        r = self.info_["radius_um"]
        mx = p["max_neighbors"]
        if mx is None:
            full = neighbor_tokens(adata, r, valid=ok) if r > 0 else None
            mx = 0 if full is None else min(int(full.mask[ok].sum(1).max()) - 1, 48)
        self.info_["max_neighbors"] = int(mx)
        index, offset, mask = self._tokens(adata, ok, mx)
        f, index, offset, mask = self._with_context(adata, f, ok, index, offset, mask, fit=True)
        self.info_["d_in"] = int(f.shape[1])
        self._views_z = self._view_features(adata, ok) if p["views"] else None
        return f, index, offset, mask, probs, ok

    def _with_context(self, adata: ad.AnnData, f: np.ndarray, ok: np.ndarray, index, offset, mask, fit: bool,
                      stats=None, context_stats=None):
        """Append the context token: rows n..2n-1 of the features hold each spot's context feature
        (normalised and projected with their own statistics, ``ctx_*``), one more token column
        points at them (offset 0; padded where the spot or its context has no feature).
        ``context_stats``: the whole section's context-feature (mean, sd), needed with ``stats``."""
        key = self.params.get("context_key")
        if not key:
            return f, index, offset, mask
        if stats is not None and context_stats is None and self.params["feature_norm"] == "section":
            raise StdistillError("prediction on part of a section (stats=) with the context token needs the whole "
                                 "section's context-feature statistics too (context_stats=)")
        if key not in adata.obsm:
            raise StdistillError(f'AnnData has no obsm["{key}"] (context features); run stdistill.features.extract('
                                 f'adata, size_um=..., key_added="{key}") first')
        c = np.asarray(adata.obsm[key], dtype=np.float32)
        if c.shape[0] != adata.n_obs:
            raise StdistillError(f'obsm["{key}"] must be (n_obs, n_features), got {c.shape}')
        keys = ("feat_mean", "feat_sd", "pca_mean", "pca_components")
        main = {k: self.info_.pop(k) for k in keys if k in self.info_}  # reuse _normalise with ctx_* stats
        self.info_.update({k: self.info_.pop(f"ctx_{k}") for k in keys if f"ctx_{k}" in self.info_})
        try:
            z, okc = self._normalise(adata, c, fit=fit, stats=context_stats)
        finally:
            ctx = {f"ctx_{k}": self.info_.pop(k) for k in keys if k in self.info_}
            self.info_.update(main)
            self.info_.update(ctx)
        if z.shape[1] != f.shape[1]:
            raise StdistillError(f'obsm["{key}"] gives {z.shape[1]} dimensions after projection but the patch features '
                                 f"{f.shape[1]}: use the same encoder (and n_pcs)")
        n = adata.n_obs
        has = ok & okc
        col = np.where(has, np.arange(n) + n, -1)[:, None]
        index = np.concatenate([index, col.astype(index.dtype)], 1)
        offset = np.concatenate([offset, np.zeros((n, 1, offset.shape[2]), offset.dtype)], 1)
        mask = np.concatenate([mask, has[:, None]], 1)
        return np.concatenate([f, z.astype(f.dtype)]), index, offset, mask

    def _view_features(self, adata: ad.AnnData, ok: np.ndarray) -> np.ndarray:
        """(n_obs, V, d) augmented views normalised (and projected) like the clean features."""
        from ._views import normalise_views

        key = f'{self.params["feature_key"]}_views'
        if key not in adata.obsm:
            raise StdistillError(f'views=True needs obsm["{key}"]; run stdistill.features.extract(adata, ..., views=K) first')
        v = normalise_views(adata, self._features(adata), adata.obsm[key], self.params["feature_norm"],
                            self.info_.get("feat_mean"), self.info_.get("feat_sd"))
        if "pca_components" in self.info_:
            v = ((v - self.info_["pca_mean"]) @ self.info_["pca_components"].T).astype(np.float32)
        v[~ok] = 0.0
        return v

    def _train(self, arrays, train_idx: np.ndarray, val_idx: np.ndarray | None, epochs: int, seed: int,
               run_dir: str | os.PathLike | None = None, stage: str = "fit"):
        """Train one net; with ``run_dir``, checkpoint every epoch and resume from the last one.

        Returns the LightningModule (histories, ``best_state``). A stage that finished is read
        back from ``done.ckpt`` instead of being trained again.
        """
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        from .._lightning import make_trainer, quiet
        from ._niche_modules import NicheDistill

        p = self.params
        f, index, offset, mask, probs, _ = arrays
        seed_everything(seed)
        net = _net(f.shape[1], p["n_niches"], p["d_model"], p["n_layers"], p["n_heads"], p["dropout"], p["summary_token"])
        g = torch.Generator().manual_seed(seed)
        mod = NicheDistill(net, f, index, offset, mask, probs, temperature=p["temperature"], hard_weight=p["hard_weight"],
                           lr=p["lr"], weight_decay=p["weight_decay"], token_drop=p["token_drop"], monitor=p["monitor"],
                           loader_generator=g)
        ro = getattr(self, "_run_opts", None) or dict(devices=1, strategy="auto", num_nodes=1, accelerator=p["device"])
        world = (ro["devices"] if isinstance(ro["devices"], int) else 1) * ro["num_nodes"]
        bs = min(-(-p["batch_size"] // world), len(train_idx))
        tr = DataLoader(TensorDataset(torch.from_numpy(train_idx)), batch_size=bs, shuffle=True, generator=g,
                        drop_last=len(train_idx) > bs and len(train_idx) % bs == 1)
        va = None if val_idx is None else DataLoader(TensorDataset(torch.from_numpy(val_idx)), batch_size=1024)
        ckpt_dir, callbacks, resume = None, [], None
        if getattr(self, "_views_z", None) is not None:
            from ._views import ViewSampler

            callbacks.append(ViewSampler(f, self._views_z, seed))
        if run_dir is not None:
            from .._resume import checkpoint_callback, last_ckpt, read_done

            ckpt_dir = _stage_dir(run_dir, stage, p, seed, epochs, arrays, train_idx, val_idx)
            if read_done(mod, ckpt_dir):
                self._resumed.append(f"{stage} (finished)")
                return mod
            callbacks.append(checkpoint_callback(ckpt_dir))
            resume = last_ckpt(ckpt_dir)
            if resume is not None:
                self._resumed.append(stage)
        trainer = make_trainer(max_epochs=epochs, monitor=p["monitor"] if va is not None else None,
                               patience=p["patience"], accelerator=ro["accelerator"], devices=ro["devices"],
                               strategy=ro["strategy"], num_nodes=ro["num_nodes"],
                               num_sanity_val_steps=0, enable_progress_bar=False, callbacks=callbacks,
                               epoch_bar=f"niche student ({stage}): epochs",
                               enable_checkpointing=ckpt_dir is not None)
        with _threads(p["num_threads"]), quiet():
            trainer.fit(mod, tr, va, ckpt_path=resume, weights_only=True)
        if ckpt_dir is not None:
            from .._resume import save_done

            save_done(trainer, ckpt_dir)
        return mod

    def fit(self, adata: ad.AnnData, probs_key: str = "niche_probs", candidates: list[dict] | None = None,
            run_dir: str | os.PathLike | None = None, *, devices: int | str = 1, strategy: str = "auto",
            num_nodes: int = 1, accelerator: str | None = None) -> NicheStudent:
        """Train on spots with features and teacher probabilities ``obsm[probs_key]`` (n_obs, K).

        ``adata`` holds the training patients only (the caller splits by patient); the
        validation patient for early stopping is taken from among them.

        ``candidates``: optional list of parameter overrides (e.g. ``[{"radius_um": 300},
        {"radius_um": 650}]``). Each is trained on the training patients minus the validation
        patient and scored on the validation patient (best ``monitor`` value over epochs); the
        best is kept (ties: the first) and refitted. Settings are thus chosen inside the training
        patients only. The scores are in ``info_["selection"]``. A candidate may name other
        features (``feature_key``, ``context_key``, ``views``: e.g. stain-normalised ones; see
        :func:`stdistill.recipes.niches.fit_transfer`).

        ``run_dir``: a folder for Lightning checkpoints (one sub-folder per training stage,
        ``last.ckpt`` every epoch, ``done.ckpt`` when the stage ends). Rerunning the same call
        after a kill resumes where it stopped and ends with the same weights as an uninterrupted
        run; stages of other settings or data get other sub-folders. ``info_["resumed"]`` lists
        the stages that were resumed or read back.

        ``devices``, ``strategy``, ``num_nodes``, ``accelerator``: how Lightning runs training
        (engineering only; the model and its numbers do not depend on them beyond float
        rounding). ``strategy="ddp", devices=2, accelerator="cpu"`` trains on 2 processes (gloo);
        on GPUs ``accelerator="gpu", devices=4``; on a cluster start one process per device with
        ``torchrun``/``srun`` and pass the same values. Each process takes ``batch_size / world
        size`` spots per step, so the effective batch is the same as on one process. Lightning
        starts the other processes by re-running the script: keep the call under
        ``if __name__ == "__main__":``. ``accelerator=None``: the ``device`` parameter.
        """
        self._resumed: list[str] = []
        self._run_opts = dict(devices=devices, strategy=strategy, num_nodes=int(num_nodes),
                              accelerator=accelerator or self.params["device"])
        p = self.params
        if probs_key not in adata.obsm:
            raise StdistillError(f'AnnData has no obsm["{probs_key}"] (teacher soft labels); run NicheTeacher.predict first')
        probs = np.asarray(adata.obsm[probs_key], dtype=np.float32)
        if p["n_niches"] is None:
            p["n_niches"] = int(probs.shape[1])
        if probs.shape != (adata.n_obs, p["n_niches"]):
            raise StdistillError(f'obsm["{probs_key}"] has shape {probs.shape}, expected ({adata.n_obs}, {p["n_niches"]})')
        self.net_ = None
        for c in candidates or []:
            bad = set(c) - set(p) | ({"n_niches", "seed"} & set(c))
            if bad:
                raise StdistillError(f"candidate settings {sorted(bad)} cannot be chosen (not NicheStudent parameters)")

        pats = adata.obs[PATIENT_KEY].astype(str).to_numpy()
        f0 = self._features(adata)
        has = np.all(np.isfinite(f0), axis=1) & np.all(np.isfinite(probs), axis=1)
        train_pats = sorted(set(pats[has]))
        vp = p["val_patients"]
        each = vp == "each"
        block = vp in ("smallest", "each") and len(train_pats) < 2
        if vp in ("smallest", "each"):
            vp = [] if block else [min(train_pats, key=lambda q: ((pats[has] == q).sum(), q))]
        vp = [] if vp is None else [str(v) for v in vp]
        missing = set(vp) - set(train_pats)
        if missing:
            raise StdistillError(f"validation patients {sorted(missing)} are not in the training data")
        is_val = np.isin(pats, vp) & has
        if block:
            is_val = self._one_patient_block(adata, has, train_pats)
        if (has & ~is_val).sum() < 2:
            raise StdistillError("no training spots left after taking the validation patients out")
        seed = p["seed"]
        base = dict(p)
        selection = []
        if is_val.any():
            runs = self._score_candidates(adata, probs, candidates or [{}], is_val, base, run_dir, "")
            scores = [[r[0] for r in runs]]
            epochs = [[r[2] for r in runs]]
            rotate = [q for q in train_pats if q not in vp] if each and candidates and not block else []
            for q in rotate:  # every other training patient validates in turn; only the scores are kept
                rq = self._score_candidates(adata, probs, candidates, np.isin(pats, [q]) & has, base, run_dir, f"_val{q}")
                scores.append([r[0] for r in rq])
                epochs.append([r[2] for r in rq])
            mean = np.mean(scores, axis=0)
            selection = [dict(r[1], val_score=float(m), best_epoch=int(round(float(np.mean(e)))),
                              **({"val_scores": [float(x[i]) for x in scores]} if rotate else {}))
                         for i, (r, m, e) in enumerate(zip(runs, mean, zip(*epochs)))]
            win = int(np.flatnonzero(mean <= mean.min() + 1e-9)[0])  # ties: the first listed
            _, c, _, mod, arrays, info, vloss, verr, self._views_z = runs[win]  # the winner's views, not the last's
            score, epoch = float(mean[win]), selection[win]["best_epoch"]
            if rotate:
                vp = [*vp, *rotate]
            self.params = dict(base, **c)
            self.info_ = info
            self.info_.update(val_patients=vp, val_block_spots=int(is_val.sum()) if block else 0, val_loss_history=[float(v) for v in vloss],
                              val_err_history=[float(v) for v in verr], best_epoch=epoch, best_val=score,
                              chosen=c, selection=selection)
            self._choose_refine(adata, probs, is_val, mod)
            if self.params["refit"]:
                ok = arrays[-1]
                mod = self._train(arrays, np.flatnonzero(ok), None, max(epoch, self.params["min_epochs"]), seed + 1,
                                  run_dir, "refit")
            elif mod.best_state is not None:
                mod.net.load_state_dict(mod.best_state)
        else:
            if candidates:
                raise StdistillError("choosing among candidates needs a validation patient (>= 2 training patients) "
                                     "or, with one patient, val_block > 0")
            arrays = self._prepare(adata, probs)
            mod = self._train(arrays, np.flatnonzero(arrays[-1]), None, p["max_epochs"], seed, run_dir, "fit")
            self.info_.update(val_patients=[], best_epoch=p["max_epochs"], refine={"method": "none"},
                              refine_selection=[])
        self.info_["resumed"] = list(self._resumed)
        self.info_["train_patients"] = train_pats
        self.info_["n_train_spots"] = int(arrays[-1].sum())
        self.info_["train_sections"] = sorted(set(adata.obs[SECTION_KEY].astype(str)[arrays[-1]]))
        made = adata.uns.get("features", {})
        self.info_["features"] = _jsonable(dict(made.get(self.params["feature_key"], {})))
        if self.params["context_key"]:
            self.info_["context_features"] = _jsonable(dict(made.get(self.params["context_key"], {})))
        names = niche_names(adata, probs_key[: -len("_probs")]) if probs_key.endswith("_probs") else None
        if names is not None and len(names) == self.params["n_niches"]:
            self.info_["niche_names"] = names
        self.net_ = mod.net.eval()
        return self

    def _score_candidates(self, adata: ad.AnnData, probs: np.ndarray, candidates: list[dict], is_val: np.ndarray,
                          base: dict, run_dir, tag: str) -> list[tuple]:
        """Train each candidate on the spots outside ``is_val`` and score it there (best
        ``monitor`` value over epochs): per candidate ``(score, overrides, best epoch, module,
        arrays, info_, val loss history, val error history, views)``."""
        out = []
        for i, c in enumerate(candidates):
            self.params = dict(base, **c)
            arrays = self._prepare(adata, probs)
            ok = arrays[-1]
            mod = self._train(arrays, np.flatnonzero(ok & ~is_val), np.flatnonzero(ok & is_val),
                              self.params["max_epochs"], self.params["seed"], run_dir, f"candidate{i}{tag}")
            hist = mod.monitor_history
            score = float(min(hist)) if hist else float("inf")
            epoch = int(np.argmin(hist)) + 1 if hist else self.params["max_epochs"]
            out.append((score, c, epoch, mod, arrays, dict(self.info_), list(mod.val_history), list(mod.val_err_history),
                        self._views_z))
        return out

    def _choose_refine(self, adata: ad.AnnData, probs: np.ndarray, is_val: np.ndarray, mod) -> None:
        """Pick the refinement of ``refine_grid`` on the validation spots with the pre-refit model."""
        from ._refine import choose_refinement

        grid = self.params["refine_grid"]
        if not grid:
            self.info_.update(refine={"method": "none"}, refine_selection=[])
            return
        import copy

        net = copy.deepcopy(mod.net)
        if mod.best_state is not None:
            net.load_state_dict(mod.best_state)
        self.net_ = net.eval()
        try:
            pred = self.predict_proba(adata, extract=False)
        finally:
            self.net_ = None
        teacher = np.where(np.all(np.isfinite(probs), axis=1), np.nan_to_num(probs).argmax(1), -1)
        chosen, table = choose_refinement(adata, pred, teacher, is_val & (teacher >= 0), grid,
                                          feature_key=self.params["feature_key"], seed=self.params["seed"],
                                          student_radius_um=self.info_.get("radius_um"))
        self.info_.update(refine=chosen, refine_selection=table)

    def _one_patient_block(self, adata: ad.AnnData, has: np.ndarray, train_pats: list[str]) -> np.ndarray:
        """The spatial validation block used when only one patient trains (warned)."""
        from ._views import spatial_block

        frac = self.params["val_block"]
        if frac <= 0:
            warnings.warn(f"NicheStudent: one training patient ({train_pats[0]}) and val_block=0: no early stopping, "
                          f"training all {self.params['max_epochs']} epochs", UserWarning, stacklevel=3)
            return np.zeros(adata.n_obs, dtype=bool)
        is_val = spatial_block(adata, has, frac)
        warnings.warn(f"NicheStudent: one training patient ({train_pats[0]}), so no validation patient: early stopping on "
                      f"a spatial block instead ({int(is_val.sum())} spots, {frac:.0%} of each section along its longer axis)",
                      UserWarning, stacklevel=3)
        return is_val

    # ------------------------------------------------------------------ predict
    def _check_fitted(self):
        if self.net_ is None:
            raise StdistillError("NicheStudent is not fitted: call .fit(adata) or NicheStudent.load(path)")

    def predict_proba(self, adata: ad.AnnData, extract: bool = True, batch_size: int = 1024, stats=None,
                      context_stats=None) -> np.ndarray:
        """(n_obs, K) niche probabilities from H&E features alone (NaN rows: spots without features).

        Works on spot data and on :func:`stdistill.pp.tile` output alike. Features (and context
        features) missing from ``obsm`` are extracted first when ``extract``, as the training
        ones were made (their record at fit: encoder, patch size, precision, and the stain
        normalisation with its stored reference). Features whose ``uns["features"]`` record names
        another encoder, patch size or stain normalisation are refused.
        ``stats``: the whole section's feature (mean, sd) when ``adata`` holds only part of it
        (e.g. a chunk of a slide); with a context token also ``context_stats``, the whole
        section's context-feature (mean, sd).
        """
        import torch

        self._check_fitted()
        f = self._features(adata, extract=extract)
        ck = self.params["context_key"]
        if ck and ck not in adata.obsm and extract:
            self._extract_missing(adata, ck, "context_features")
        if ck and ck in adata.obsm:
            self._check_stain(adata, ck, "context_features")
        f, ok = self._normalise(adata, f, fit=False, stats=stats)
        index, offset, mask = self._tokens(adata, ok, self.info_["max_neighbors"])
        f, index, offset, mask = self._with_context(adata, f, ok, index, offset, mask, fit=False, stats=stats,
                                                    context_stats=context_stats)
        out = np.full((adata.n_obs, self.params["n_niches"]), np.nan, dtype=np.float32)
        rows = np.flatnonzero(ok)
        ft, it, ot, mt = (torch.from_numpy(a) for a in (f, index, offset, mask))
        with torch.inference_mode(), _threads(self.params.get("num_threads")):
            for s in range(0, len(rows), batch_size):
                r = torch.from_numpy(rows[s:s + batch_size])
                m = mt[r]
                x = ft[it[r].clamp_min(0)] * m.unsqueeze(-1)
                out[rows[s:s + batch_size]] = torch.softmax(self.net_(x, ot[r], m), -1).numpy()
        return out

    def predict(self, adata: ad.AnnData, key_added: str = "niche_pred", extract: bool = True, refine: str | None = None,
                refine_kwargs: dict | None = None) -> np.ndarray:
        """Write ``obs[key_added]`` (categorical "0".."K-1") and ``obsm[f"{key_added}_probs"]`` (n_obs, K).

        The default key differs from the teacher's ``"niche"``, so predicting on the teacher's
        file never overwrites its labels. ``refine`` (``"auto"``: the refinement chosen on the
        validation patient at fit, ``info_["refine"]``; or ``"none"``, ``"propagate"``, ``"gmm"``,
        ``"both"`` with ``refine_kwargs``): also refine them with each section's own structure (:func:`stdistill.students.refine_niches`,
        label-free, H&E only) into ``obs[key_added + "_refined"]`` /
        ``obsm[key_added + "_refined_probs"]``; the raw ones stay. Returns the raw probabilities."""
        probs = self.predict_proba(adata, extract=extract)
        write_niches(adata, probs, key_added)
        if refine:
            from ._refine import refine_niches, resolve_refinement

            kw = {"feature_key": self.params["feature_key"], "seed": self.params["seed"]}
            if refine == "auto":
                kw.update(self.info_.get("refine") or {"method": "none"})
            else:
                kw["method"] = refine
            kw.update(refine_kwargs or {})
            kw = resolve_refinement(kw, self.info_.get("radius_um"))
            refine_niches(adata, f"{key_added}_probs", key_added=f"{key_added}_refined", **kw)
        return probs

    # ------------------------------------------------------------------ persistence
    _bundle_format = _FORMAT

    def bundle_record(self) -> dict:
        """The ``"bundle"`` entry of the saved config (see :mod:`stdistill.bundle`)."""
        self._check_fitted()
        p, made = self.params, self.info_.get("features") or {}
        return bundle_record(
            "niches", features=made, encoder=made.get("encoder", p["encoder"]), size_um=made.get("size_um", p["size_um"]),
            px=made.get("px", p["px"]), feature_norm=p["feature_norm"],
            outputs={"niches": self.info_.get("niche_names") or [str(i) for i in range(p["n_niches"])]},
            training={key: self.info_.get(key) for key in ("train_patients", "train_sections", "n_train_spots",
                                                           "val_patients", "best_epoch", "radius_um", "refine",
                                                           "transfer")},
        )

    def _bundle_parts(self) -> tuple[dict, dict, dict]:
        """(config, tensors, record) for :func:`stdistill.bundle.save_bundle`."""
        self._check_fitted()
        tensors = dict(self.net_.state_dict())
        for k in _ARRAYS:
            if k in self.info_:
                tensors[f"_norm.{k}"] = np.asarray(self.info_[k])  # dtype kept: same numbers after load
        info = {k: v for k, v in self.info_.items() if k not in _ARRAYS}
        return {"params": self.params, "info": info}, tensors, self.bundle_record()

    @classmethod
    def _from_bundle(cls, cfg, tensors, record, path, *, device: str = "cpu", **_) -> NicheStudent:
        try:
            s = cls(**dict(cfg["params"], device=device))
        except TypeError as e:
            raise StdistillError(f"config.json has parameters this version does not know ({e})", path) from None
        s.info_ = dict(cfg["info"])
        for k in _ARRAYS:
            t = tensors.pop(f"_norm.{k}", None)
            if t is not None:
                s.info_[k] = t.numpy()
        p = s.params
        net = _net(int(cfg["info"]["d_in"]), p["n_niches"], p["d_model"], p["n_layers"], p["n_heads"], p["dropout"],
                   p["summary_token"])
        load_state(net, tensors, path, "NicheStudent")
        s.net_ = net.eval()
        return s
