"""The niche student's data: features (checked against their record), normalisation, PCA,
neighbourhood tokens, the context token and augmented views."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from ..._errors import StdistillError
from ..._keys import Key
from ..._moments import section_moments
from ..._pca import finite_rows, fit_pca_auto, project, standardized_blocks
from ...bundle._format import check_record
from ...pp.neighbors import neighbor_tokens, radius_for_neighbors, user_graph
from ._config import FEATURE_NORMS

__all__ = ["NicheData", "normalise_features"]


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


class NicheData:
    """The data side of :class:`~stdistill.students.NicheStudent` (a mixin: ``config``, ``info_``, ``net_``)."""

    def feature_record(self, context: bool = False) -> dict:
        """How the training features (or, ``context=True``, the context features) were made: their
        ``uns["features"]`` record at fit (encoder, size_um, px, precision, stain state); for
        models saved before records were kept, the patch settings of the parameters."""
        c = self.config
        rec = self.info_.get("context_features" if context else "features")
        if rec:
            return rec
        if context:
            raise StdistillError(f'the model does not record how its context features (obsm["{c.context_key}"]) were '
                                 "made; pass them in obsm, or retrain it with this version")
        return {"encoder": c.encoder, "size_um": c.size_um, "px": c.px}

    def _extract_missing(self, adata: ad.AnnData, key: str, what: str) -> None:
        """Extract ``obsm[key]`` as the training features were made (encoder, patch, precision,
        stain normalisation onto the stored reference), through the feature cache."""
        from ...features import extract, extraction_kwargs

        made = self.feature_record(context=what == "context_features")
        if made.get("encoder"):
            extract(adata, key_added=key, **extraction_kwargs(made))

    def _check_stain(self, adata: ad.AnnData, key: str, what: str) -> None:
        """Refuse ``obsm[key]`` whose record names another stain normalisation than training's."""
        from ...pp._stain import round_estimate

        made = adata.uns.get(Key.uns.features, {}).get(key)
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
        key = self.config.feature_key
        if key not in adata.obsm:
            if extract:
                self._extract_missing(adata, key, "features")
            if key not in adata.obsm:
                raise StdistillError(
                    f'AnnData has no obsm["{key}"] (patch features); run stdistill.features.extract(adata, '
                    f'encoder="{self.config.encoder}") first'
                )
        f = adata.obsm[key]
        f = np.asarray(f.to_numpy() if isinstance(f, pd.DataFrame) else f, dtype=np.float32)
        if f.ndim != 2 or f.shape[0] != adata.n_obs:
            raise StdistillError(f'obsm["{key}"] must be (n_obs, n_features), got {f.shape}')
        if self.net_ is not None and self.info_.get("features"):
            check_record(self.bundle_record(), adata.uns.get(Key.uns.features, {}).get(key), f'obsm["{key}"]')
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
        if self.config.feature_norm == "global" and fit:
            ok = finite_rows(f)
            fo = f if ok.all() else f[ok]
            self.info_["feat_mean"] = fo.mean(0)
            sd = fo.std(0)
            sd[sd < 1e-6] = 1.0
            self.info_["feat_sd"] = sd
        how, mean, sd = self.config.feature_norm, self.info_.get("feat_mean"), self.info_.get("feat_sd")
        if stats is not None and how == "section" and not fit:
            how, (mean, sd) = "global", stats
        k = self.config.n_pcs
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
                lambda: standardized_blocks(f, parts), *f.shape, k, seed=self.config.seed)
        z = project(standardized_blocks(f, parts), self.info_["pca_mean"], self.info_["pca_components"], len(f))
        return z, ok

    def _graph(self, adata: ad.AnnData):
        """The user's spot graph under ``connectivity_key`` (its edges replace the radius), or None."""
        return user_graph(adata, self.config.connectivity_key) if self.info_["radius_um"] > 0 else None

    def _tokens(self, adata: ad.AnnData, ok: np.ndarray, max_neighbors: int | None, graph=None):
        """Token index (n, 1 + M), offsets / radius (n, 1 + M, 2) and mask: each spot's valid neighbours
        within ``info_["radius_um"]`` (or on ``graph``), nearest first."""
        r = self.info_["radius_um"]
        tok = neighbor_tokens(adata, r, max_neighbors=max_neighbors, valid=ok,
                              graph=self._graph(adata) if graph is None else graph)
        r = r or 1.0
        return tok.index, (tok.offset_um / r).astype(np.float32), tok.mask

    def _prepare(self, adata: ad.AnnData, probs: np.ndarray):
        """Inputs for training under the current config: features, tokens, soft labels, mask."""
        p = self.config
        f = self._features(adata)
        self.info_ = {"d_feat": int(f.shape[1])}
        f, ok = self._normalise(adata, f, fit=True)
        ok &= np.all(np.isfinite(probs), axis=1)
        if ok.sum() < 2:
            raise StdistillError("fewer than 2 spots have both patch features and teacher probabilities")
        probs = np.where(ok[:, None], probs, 1.0 / p.n_niches)
        probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
        r = p.radius_um
        self.info_["radius_um"] = float(radius_for_neighbors(adata, p.n_neighbors, mask=ok) if r is None else r)
        r = self.info_["radius_um"]
        mx, graph = p.max_neighbors, self._graph(adata)
        if mx is None:
            full = neighbor_tokens(adata, r, valid=ok, graph=graph) if r > 0 else None
            mx = 0 if full is None else min(int(full.mask[ok].sum(1).max()) - 1, 48)
        self.info_["max_neighbors"] = int(mx)
        index, offset, mask = self._tokens(adata, ok, mx, graph)
        f, index, offset, mask = self._with_context(adata, f, ok, index, offset, mask, fit=True)
        self.info_["d_in"] = int(f.shape[1])
        self._views_z = self._view_features(adata, ok) if p.views else None
        return f, index, offset, mask, probs, ok

    def _with_context(self, adata: ad.AnnData, f: np.ndarray, ok: np.ndarray, index, offset, mask, fit: bool,
                      stats=None, context_stats=None):
        """Append the context token: rows n..2n-1 of the features hold each spot's context feature
        (normalised and projected with their own statistics, ``ctx_*``), one more token column
        points at them (offset 0; padded where the spot or its context has no feature).
        ``context_stats``: the whole section's context-feature (mean, sd), needed with ``stats``."""
        key = self.config.context_key
        if not key:
            return f, index, offset, mask
        if stats is not None and context_stats is None and self.config.feature_norm == "section":
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
        from .._views import normalise_views

        key = Key.obsm.views(self.config.feature_key)
        if key not in adata.obsm:
            raise StdistillError(f'views=True needs obsm["{key}"]; run stdistill.features.extract(adata, ..., views=K) first')
        v = normalise_views(adata, self._features(adata), adata.obsm[key], self.config.feature_norm,
                            self.info_.get("feat_mean"), self.info_.get("feat_sd"))
        if "pca_components" in self.info_:
            v = ((v - self.info_["pca_mean"]) @ self.info_["pca_components"].T).astype(np.float32)
        v[~ok] = 0.0
        return v
