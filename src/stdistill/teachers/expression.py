"""Transcriptomic teacher for expression distillation: one embedding per spot from its counts.

Methods (``ExpressionTeacher(method=...)``):

- ``"pca"`` (default): log-normalised counts (CP10k + log1p) of the highly variable genes of the
  training spots, standardised per ``batch_key`` group (``standardize="batch"``, default: removes
  section/patient offsets, which dominate HER2ST) or globally (``"global"``), clipped at 10, then
  PCA to ``n_components``.
- ``"scvi"``: scVI's latent mean (scvi-tools, ``pip install 'stdistill[scvi]'``), with
  ``batch_key`` as scVI's batch. Imported only when used.
- any name registered with :func:`register_embedder`, or an embedder object passed directly:
  a plug-in for single-cell foundation models (scGPT, Geneformer, scFoundation...).

The plug-in interface (:class:`CountEmbedder`) is a callable
``embedder(counts, genes) -> (n_spots, dim) float array`` taking raw counts (``scipy.sparse``
CSR, spots x genes) and the gene symbols of the columns; the model does its own gene-vocabulary
matching, normalisation and binning. Optionally it has ``fit(counts, genes)`` (called once on the
training spots) and ``dim``. Its output is standardised per batch like the PCA path
(``standardize=``). Example (sketch; needs the model's own package and weights)::

    from stdistill.teachers import ExpressionTeacher, register_embedder

    class ScGPTEmbedder:
        def __init__(self, model_dir):
            import scgpt                            # the model's own package
            self.model_dir = model_dir
        def __call__(self, counts, genes):
            import anndata as ad, pandas as pd, scgpt
            a = ad.AnnData(counts, var=pd.DataFrame(index=genes))
            a.var["gene_name"] = list(genes)
            out = scgpt.tasks.embed_data(a, self.model_dir, gene_col="gene_name")
            return out.obsm["X_scGPT"]

    register_embedder("scgpt", ScGPTEmbedder)      # factory(**embedder_kwargs) -> embedder
    teacher = ExpressionTeacher("scgpt", embedder_kwargs={"model_dir": "..."}).fit(train)

Fit the teacher on **training patients only**; it may use their sections without images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._api import write_obsm
from .._errors import StdistillError
from .._keys import Key
from .._utils import seed_everything, torch_threads_kept
from ..bundle import Bundled
from ..io._section import SECTION_KEY

__all__ = ["CountEmbedder", "ExpressionTeacher", "register_embedder", "embedders", "teacher_targets"]

_FORMAT = "stdistill.ExpressionTeacher/2"
_REGISTRY: dict[str, Callable[..., Any]] = {}


@runtime_checkable
class CountEmbedder(Protocol):
    """A single-cell (foundation) model as an expression teacher.

    ``__call__(counts, genes)``: ``counts`` raw counts, ``scipy.sparse.csr_matrix`` (n_spots x
    n_genes); ``genes`` the n_genes symbols of its columns. Returns (n_spots, dim) floats.
    Optional: ``fit(counts, genes)`` (called once on the training spots), ``dim`` (int).
    """

    def __call__(self, counts: sp.csr_matrix, genes: Sequence[str]) -> np.ndarray: ...


def register_embedder(name: str, factory: Callable[..., CountEmbedder], overwrite: bool = False) -> None:
    """Make ``ExpressionTeacher(method=name, embedder_kwargs=...)`` call ``factory(**embedder_kwargs)``."""
    if name in ("pca", "scvi"):
        raise StdistillError(f"{name!r} is a built-in method; register the plug-in under another name")
    if name in _REGISTRY and not overwrite:
        raise StdistillError(f"an embedder named {name!r} is already registered (pass overwrite=True)")
    if not callable(factory):
        raise StdistillError(f"embedder factory for {name!r} is not callable")
    _REGISTRY[name] = factory


def embedders() -> list[str]:
    """Names usable as ``method``: built-ins and registered plug-ins."""
    return ["pca", "scvi", *sorted(_REGISTRY)]


def _counts(adata: ad.AnnData, layer: str | None) -> sp.csr_matrix:
    X = adata.layers[layer] if layer else adata.X
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    return X


def _log_norm(X: sp.csr_matrix, target_sum: float) -> np.ndarray:
    lib = np.asarray(X.sum(1)).ravel().astype(np.float64)
    lib[lib == 0] = 1.0
    return np.log1p((sp.diags(target_sum / lib) @ X.astype(np.float64)).toarray()).astype(np.float32)


def _standardize_groups(Z: np.ndarray, groups: np.ndarray | None, clip: float | None = 10.0) -> np.ndarray:
    """Z-score each column within each group (groups=None: whole array); constant columns -> 0."""
    out = np.empty_like(Z, dtype=np.float32)
    gs = np.zeros(len(Z), dtype=int) if groups is None else pd.factorize(groups)[0]
    for g in np.unique(gs):
        m = gs == g
        mu = Z[m].mean(0)
        sd = Z[m].std(0)
        sd[sd == 0] = 1.0
        out[m] = (Z[m] - mu) / sd
    if clip is not None:
        np.clip(out, -clip, clip, out=out)
    return out


class ExpressionTeacher(Bundled):
    """Embeddings of spots from their expression (scikit-learn style: ``fit`` then ``transform``).

    Parameters
    ----------
    method
        ``"pca"``, ``"scvi"``, a registered plug-in name, or a :class:`CountEmbedder` object.
    n_components
        Embedding width for ``"pca"`` and ``"scvi"`` (scVI's ``n_latent``).
    n_top_genes
        Highly variable genes (seurat flavour on log-normalised counts of the training spots,
        per ``batch_key``) used by ``"pca"``/``"scvi"``; ``None``: all genes.
    standardize
        ``"batch"`` (z-score within each ``batch_key`` group: section-level offsets removed),
        ``"global"`` (scaler fitted on the training spots) or ``None``. For ``"pca"`` it applies
        to the log-expression before PCA; for plug-ins to their output.
    batch_key
        ``obs`` column of the batches (default ``"section"``).
    embedder_kwargs
        Passed to a registered plug-in's factory.
    scvi_kwargs
        ``{"max_epochs": ..., "n_layers": ..., ...}`` for scVI (model and ``train`` keywords).
    """

    def __init__(
        self,
        method: str | CountEmbedder = "pca",
        n_components: int = 32,
        n_top_genes: int | None = 2000,
        standardize: str | None = "batch",
        batch_key: str = SECTION_KEY,
        target_sum: float = 1e4,
        layer: str | None = None,
        seed: int = 0,
        embedder_kwargs: dict | None = None,
        scvi_kwargs: dict | None = None,
    ):
        if standardize not in ("batch", "global", None):
            raise StdistillError(f"standardize must be 'batch', 'global' or None, got {standardize!r}")
        if isinstance(method, str) and method not in ("pca", "scvi") and method not in _REGISTRY:
            raise StdistillError(f"unknown teacher method {method!r}; choose one of {embedders()} or register_embedder()")
        if not isinstance(method, str) and not callable(method):
            raise StdistillError("method must be a name or a callable embedder(counts, genes) -> array")
        self.method, self.n_components, self.n_top_genes = method, n_components, n_top_genes
        self.standardize, self.batch_key, self.target_sum, self.layer = standardize, batch_key, target_sum, layer
        self.seed, self.embedder_kwargs, self.scvi_kwargs = seed, dict(embedder_kwargs or {}), dict(scvi_kwargs or {})

    # ------------------------------------------------------------------ helpers
    def _groups(self, adata: ad.AnnData) -> np.ndarray | None:
        if self.standardize != "batch" and self.method != "scvi":
            return None
        if self.batch_key not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{self.batch_key}"] (the teacher\'s batch_key)')
        return adata.obs[self.batch_key].astype(str).to_numpy()

    def _gene_matrix(self, adata: ad.AnnData) -> sp.csr_matrix:
        """Counts of ``genes_`` in ``adata`` (genes it lacks are zero columns)."""
        X = _counts(adata, self.layer)
        pos = adata.var_names.get_indexer(self.genes_)
        have = pos >= 0
        if have.sum() < 0.5 * len(pos):
            raise StdistillError(
                f"only {int(have.sum())} of the teacher's {len(pos)} genes are in the data; "
                "it was fitted on another gene panel")
        if have.all():
            return X[:, pos]
        cols = X[:, pos[have]].tocoo()
        idx = np.flatnonzero(have)
        return sp.csr_matrix((cols.data, (cols.row, idx[cols.col])), shape=(X.shape[0], len(pos)))

    def _plugin(self):
        if not isinstance(self.method, str):
            return self.method
        if not hasattr(self, "_embedder"):
            self._embedder = _REGISTRY[self.method](**self.embedder_kwargs)
        return self._embedder

    # ------------------------------------------------------------------ API
    def fit(self, adata: ad.AnnData) -> ExpressionTeacher:
        """Fit on the training spots (raw counts in ``X`` or ``layer``). Never on test patients."""
        import scanpy as sc

        if adata.n_obs < 3:
            raise StdistillError(f"teacher needs at least 3 spots to fit, got {adata.n_obs}")
        seed_everything(self.seed)
        X = _counts(adata, self.layer)
        if self.method in ("pca", "scvi"):
            genes = adata.var_names
            if self.n_top_genes is not None and self.n_top_genes < adata.n_vars:
                tmp = ad.AnnData(X=sp.csr_matrix(_log_norm(X, self.target_sum)), var=pd.DataFrame(index=adata.var_names))
                keep = np.asarray((X > 0).sum(0)).ravel() > 0
                tmp = tmp[:, keep].copy()
                batch = None
                if self.batch_key in adata.obs and adata.obs[self.batch_key].nunique() > 1:
                    tmp.obs["_b"] = adata.obs[self.batch_key].astype(str).to_numpy()
                    batch = "_b"
                with torch_threads_kept():
                    sc.pp.highly_variable_genes(tmp, n_top_genes=min(self.n_top_genes, tmp.n_vars), flavor="seurat",
                                                batch_key=batch)
                genes = tmp.var_names[tmp.var["highly_variable"].to_numpy()]
            self.genes_ = [str(g) for g in genes]
        else:
            self.genes_ = [str(g) for g in adata.var_names]
        G = self._gene_matrix(adata)
        groups = self._groups(adata)
        if self.method == "pca":
            from sklearn.decomposition import PCA

            Z = _log_norm(G, self.target_sum)
            if self.standardize == "global":
                self.mean_, self.scale_ = Z.mean(0), Z.std(0)
                self.scale_[self.scale_ == 0] = 1.0
            Z = self._scale(Z, groups)
            k = int(min(self.n_components, Z.shape[0] - 1, Z.shape[1]))
            self.pca_ = PCA(n_components=k, random_state=self.seed).fit(Z)
        elif self.method == "scvi":
            self._fit_scvi(adata, G)
        else:
            emb = self._plugin()
            if hasattr(emb, "fit"):
                emb.fit(G, list(self.genes_))
            out = self._call_plugin(G)
            if self.standardize == "global":
                self.mean_, self.scale_ = out.mean(0), out.std(0)
                self.scale_[self.scale_ == 0] = 1.0
        self.n_fit_ = adata.n_obs
        return self

    def _scale(self, Z: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        if self.standardize == "batch":
            return _standardize_groups(Z, groups)
        if self.standardize == "global":
            return np.clip((Z - self.mean_) / self.scale_, -10, 10).astype(np.float32)
        return Z.astype(np.float32)

    def _call_plugin(self, G: sp.csr_matrix) -> np.ndarray:
        out = np.asarray(self._plugin()(G, list(self.genes_)), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != G.shape[0]:
            raise StdistillError(f"embedder {self.method!r} returned shape {out.shape}; expected ({G.shape[0]}, dim)")
        if not np.isfinite(out).all():
            raise StdistillError(f"embedder {self.method!r} returned NaN or infinite values")
        return out

    def _fit_scvi(self, adata: ad.AnnData, G: sp.csr_matrix) -> None:
        scvi = _import_scvi()
        kw = dict(self.scvi_kwargs)
        max_epochs = kw.pop("max_epochs", 200)
        a = ad.AnnData(X=G.astype(np.float32), obs=pd.DataFrame({"_b": self._groups(adata)}, index=adata.obs_names),
                       var=pd.DataFrame(index=self.genes_))
        scvi.settings.seed = self.seed
        scvi.model.SCVI.setup_anndata(a, batch_key="_b")
        self.scvi_ = scvi.model.SCVI(a, n_latent=self.n_components, **kw)
        self.scvi_.train(max_epochs=max_epochs, accelerator="cpu", enable_progress_bar=False)
        self.scvi_batches_ = sorted(set(a.obs["_b"]))

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        """(n_spots, dim) float32 teacher embeddings of ``adata``'s spots."""
        if not hasattr(self, "genes_"):
            raise StdistillError("ExpressionTeacher is not fitted; call fit() on training sections first")
        G = self._gene_matrix(adata)
        groups = self._groups(adata)
        if self.method == "pca":
            Z = self._scale(_log_norm(G, self.target_sum), groups)
            return self.pca_.transform(Z).astype(np.float32)
        if self.method == "scvi":
            unseen = sorted(set(groups) - set(self.scvi_batches_))
            if unseen:
                raise StdistillError(
                    f"scVI teacher was not fitted on batches {unseen[:3]}; fit it on every section it must embed "
                    "(the training patients' sections)")
            a = ad.AnnData(X=G.astype(np.float32), obs=pd.DataFrame({"_b": groups}, index=adata.obs_names),
                           var=pd.DataFrame(index=self.genes_))
            return np.asarray(self.scvi_.get_latent_representation(a), dtype=np.float32)
        out = self._call_plugin(G)
        if self.standardize == "batch":
            return _standardize_groups(out, groups, clip=None)
        if self.standardize == "global":
            return ((out - self.mean_) / self.scale_).astype(np.float32)
        return out

    def fit_transform(self, adata: ad.AnnData, key_added: str | None = Key.obsm.teacher, *, inplace: bool = True,
                      copy: bool = False) -> ad.AnnData | np.ndarray | None:
        """Fit on ``adata`` and write its (n_spots, dim) float32 embeddings to ``obsm[key_added]``.
        Returns None (``copy=True``: a new AnnData; ``inplace=False``: the array, nothing written;
        :meth:`transform` embeds other spots as an array).

        .. versionchanged:: returns None when it writes (it returned the array too)."""
        return write_obsm(adata, self.fit(adata).transform(adata), key_added, inplace=inplace, copy=copy,
                          where="ExpressionTeacher.fit_transform")

    @property
    def dim(self) -> int:
        if self.method == "pca":
            return int(self.pca_.n_components_)
        if self.method == "scvi":
            return int(self.n_components)
        return int(getattr(self._plugin(), "dim", -1))

    # ------------------------------------------------------------------ persistence (PCA only; a bundle folder)
    _bundle_format = _FORMAT

    def _bundle_parts(self) -> tuple[dict, dict, dict]:
        from ..bundle import bundle_record

        if self.method != "pca" or not hasattr(self, "pca_"):
            raise StdistillError("only a fitted 'pca' teacher can be saved; scVI has its own save(), plug-ins theirs")
        cfg = {"genes": self.genes_, "standardize": self.standardize, "batch_key": self.batch_key,
               "target_sum": self.target_sum, "n_components": self.n_components, "seed": self.seed}
        arrays = {"components": self.pca_.components_, "pca_mean": self.pca_.mean_}
        if self.standardize == "global":
            arrays.update(mean=self.mean_, scale=self.scale_)
        rec = bundle_record("expression_teacher", outputs={"genes": self.genes_},
                            training={"method": "pca", "n_components": int(self.pca_.n_components_)})
        return cfg, arrays, rec

    @classmethod
    def _from_bundle(cls, meta, z, record, path, **_) -> ExpressionTeacher:
        from sklearn.decomposition import PCA

        from ..bundle import check_shapes

        g = len(meta["genes"])
        check_shapes(z, {"components": ("k", g), "pca_mean": (g,), "mean?": (g,), "scale?": (g,)}, path, "ExpressionTeacher")
        z = {k: v.numpy() for k, v in z.items()}
        t = cls("pca", n_components=meta["n_components"], standardize=meta["standardize"], batch_key=meta["batch_key"],
                target_sum=meta["target_sum"], seed=meta["seed"])
        t.genes_ = list(meta["genes"])
        t.pca_ = PCA(n_components=z["components"].shape[0])
        t.pca_.components_, t.pca_.mean_ = z["components"], z["pca_mean"]
        t.pca_.n_components_ = z["components"].shape[0]
        t.pca_.n_features_in_ = z["components"].shape[1]
        t.pca_.whiten = False
        if "mean" in z:
            t.mean_, t.scale_ = z["mean"], z["scale"]
        return t

def _import_scvi():
    try:
        import scvi  # noqa: F401
    except ImportError as e:
        raise StdistillError(
            f"the 'scvi' teacher needs scvi-tools, which is not installed ({e.msg}); "
            "pip install 'stdistill[scvi]', or use method='pca'"
        ) from None
    return scvi


def teacher_targets(
    embeddings: np.ndarray, n_clusters: int = 16, seed: int = 0, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PEKA's knowledge-distillation targets from teacher embeddings (training spots).

    k-means clusters the (n, D) ``embeddings`` into ``n_clusters`` groups; a multinomial logistic
    regression fitted on the embeddings predicts those groups. Returns ``(W, b, probs, labels)``:
    the classifier's (C, D) weights and (C,) bias (used frozen on the student's projected
    embedding), the teacher's (n, C) class probabilities and (n,) k-means labels.
    """
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression

    E = np.asarray(embeddings, dtype=np.float64)
    if len(E) < n_clusters:
        raise StdistillError(f"{len(E)} teacher embeddings cannot form {n_clusters} clusters; lower n_clusters")
    labels = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit_predict(E)
    clf = LogisticRegression(max_iter=300, tol=1e-3, C=1.0, random_state=seed).fit(E, labels)
    W = np.zeros((n_clusters, E.shape[1]))
    b = np.zeros(n_clusters)
    if len(clf.classes_) == 2:  # binary: scikit-learn keeps one row; class 0 gets the zero logit
        W[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        W[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
    missing = np.setdiff1d(np.arange(n_clusters), clf.classes_)
    b[missing] = -1e4  # (cannot happen with k-means labels; kept for safety)
    logits = E @ W.T + b
    logits /= temperature
    logits -= logits.max(1, keepdims=True)
    P = np.exp(logits)
    P /= P.sum(1, keepdims=True)
    return W.astype(np.float32), b.astype(np.float32), P.astype(np.float32), labels.astype(np.int64)
