"""Transcriptomic niche teachers: soft niche labels from expression + coordinates (no image).

Two methods, both on a per-spot expression embedding with section/patient effects removed first:

- ``"aggregate"`` (CellCharter-like): concatenate the embedding averaged over rings 1..L of the
  spatial graph (hops of ``radius_um``), fit a Gaussian mixture, posteriors = soft labels.
- ``"nolan"`` (in the spirit of NOLAN, which has no installable release): a self-supervised model
  over spatial neighbourhoods. Each spot's global view holds its neighbours within a radius
  holding about ``n_neighbors`` spots, its local view those within 0.75 x that radius. A set
  encoder with a learned relative-position encoding maps each view to a K-way prototype
  assignment; the views predict each other's Sinkhorn-balanced assignments (SwAV-style swapped
  prediction), which cannot collapse to one niche.

Batch effects first: on HER2ST patient effects dominate the transcriptome, and a teacher on
globally scaled expression finds one niche per patient. ``batch_correction="standardize"``
(default) z-scores log-expression within each ``batch_key`` group before PCA; ``"scvi"`` uses
scVI's latent space with ``batch_key`` as batch (``pip install stdistill[scvi]``); ``"harmony"``
runs Harmony on the PCA (``pip install harmonypy``); ``None`` scales globally (the failure mode,
kept for diagnostics). :meth:`NicheTeacher.diagnostics` reports NMI(niche, patient) and niche
sizes per patient.
"""

from __future__ import annotations


import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._api import deliver, renamed_kwargs
from .._errors import StdistillError
from .._niches import write_niches
from .._pca import project, standardized_blocks
from .._utils import load_state, seed_everything
from ._embedding import _group_rows, _log_norm, _select_genes, _sparse_moments, _standardize_by
from ..bundle import Bundled, bundle_record, check_shapes
from ..io._section import PATIENT_KEY, SECTION_KEY
from ..pp.neighbors import (
    N_NEIGHBORS,
    aggregate,
    neighbor_tokens,
    radius_for_neighbors,
    spot_graph,
)

METHODS = ("nolan", "aggregate")
CORRECTIONS = ("standardize", "scvi", "harmony", None)
_FORMAT = "stdistill.NicheTeacher/2"
_ARRAYS = ("pca_components", "pca_mean", "gene_mean", "gene_sd")
#: fitted state kept in the bundle's config: K chosen, its stability curve, the consensus embedding's layout
_STATE = ("n_niches", "stability", "embed_members", "embed_width")


def _nolan_module(**hp):
    """The NOLAN-like LightningModule (:class:`~stdistill.teachers._nolan_modules.NolanLike`,
    imported here so that importing this module needs no Lightning)."""
    from ._nolan_modules import NolanLike

    return NolanLike(**hp)


# ----------------------------------------------------------------------------- teacher
class NicheTeacher(Bundled):
    """Transcriptome-only niche teacher; frozen after :meth:`fit`, gives soft niche labels.

    Parameters
    ----------
    n_niches
        K, the number of niches; ``"auto"`` (K in 3..10), a tuple ``(lo, hi)`` or a list of K: the
        K whose partition reproduces best over bagged fits (:mod:`._consensus`), curve in ``state_["stability"]``.
    method
        ``"aggregate"`` (CellCharter-like ring aggregation + Gaussian mixture) or ``"nolan"``
        (self-supervised global/local neighbourhood views with a K-way prototype head).
    feature_key
        ``obsm`` key of a per-spot expression embedding (e.g. ``"X_scVI"``); ``None``: PCA of
        log-normalised counts (``n_top_genes`` genes, ``n_pcs`` components) computed here (was ``use_rep``).
    batch_key
        ``obs`` column whose groups are corrected for (``"section"`` default; ``"patient"``).
    batch_correction
        ``"standardize"`` (per-group z-scores of log-expression, or of ``feature_key``),
        ``"scvi"`` (scVI latent with ``batch_key``; needs the ``scvi`` extra), ``"harmony"``
        (Harmony on the PCA; needs ``harmonypy``), or ``None`` (global scaling).
    radius_um
        ``"aggregate"``: one hop of the ring graph, um (``None``: 1.5 x the median
        nearest-spot distance, i.e. the first ring on ST/Visium arrays).
        ``"nolan"``: global-view radius, um (``None``: the radius holding ``n_neighbors``
        spots for the median spot); the local view uses 0.75 x it.
    n_rings
        ``"aggregate"``: rings 1..L concatenated to the spot's own embedding.
    covariance_type
        ``"aggregate"``: Gaussian mixture covariances. ``"diag"`` by default: on HER2ST full
        covariances fit patient-specific correlation structure (NMI(niche, patient) 0.65 vs 0.20).
    n_steps, batch_size, d_model
        ``"nolan"``: optimisation steps, spots per step, width of the set encoder.
    consensus
        ``"aggregate"``: number of bagged mixture fits (each on 90% of the spots, with its own PCA)
        combined by co-association into one partition (:mod:`._consensus`); 1: one mixture.
    pca_solver
        ``"auto"`` (randomized above 500 genes), ``"randomized"`` or ``"exact"`` (covariance eigenvectors).
    """

    @renamed_kwargs(use_rep="feature_key")
    def __init__(
        self,
        n_niches: int | str | tuple | list = 6,
        method: str = "aggregate",
        *,
        feature_key: str | None = None,
        batch_key: str | None = SECTION_KEY,
        batch_correction: str | None = "standardize",
        n_pcs: int = 10,
        n_top_genes: int = 2000,
        min_gene_frac: float = 0.05,
        radius_um: float | None = None,
        n_rings: int = 1,
        n_neighbors: int = N_NEIGHBORS,
        covariance_type: str = "diag",
        n_steps: int = 300,
        batch_size: int = 256,
        d_model: int = 32,
        seed: int = 0,
        consensus: int = 1,
        pca_solver: str = "auto",
    ):
        from ._consensus import SOLVERS, parse_n_niches

        if method not in METHODS:
            raise StdistillError(f"method must be one of {METHODS}, got {method!r}")
        if batch_correction not in CORRECTIONS:
            raise StdistillError(f"batch_correction must be one of {CORRECTIONS}, got {batch_correction!r}")
        n_niches = parse_n_niches(n_niches)
        if int(consensus) < 1 or (method == "nolan" and (int(consensus) > 1 or isinstance(n_niches, list))):
            raise StdistillError(f"consensus must be >= 1; 'nolan' takes neither consensus nor a range of K "
                                 f"(got consensus={consensus}, n_niches={n_niches})")
        if pca_solver not in SOLVERS:
            raise StdistillError(f"pca_solver must be one of {SOLVERS}, got {pca_solver!r}")
        if batch_correction is not None and batch_key is None:
            raise StdistillError("batch_correction needs batch_key= (e.g. 'section' or 'patient')")
        self.params = dict(
            n_niches=n_niches, method=method, feature_key=feature_key, batch_key=batch_key,
            batch_correction=batch_correction, n_pcs=int(n_pcs), n_top_genes=int(n_top_genes),
            min_gene_frac=float(min_gene_frac), radius_um=radius_um, n_rings=int(n_rings),
            n_neighbors=int(n_neighbors), covariance_type=covariance_type, n_steps=int(n_steps),
            batch_size=int(batch_size), d_model=int(d_model), seed=int(seed), consensus=int(consensus),
            pca_solver=pca_solver,
        )
        self.state_: dict | None = None

    def __repr__(self) -> str:
        p = self.params
        return (f"NicheTeacher(n_niches={p['n_niches']}, method={p['method']!r}, batch_correction={p['batch_correction']!r}"
                f", consensus={p['consensus']})")

    @property
    def n_niches(self) -> int | list[int]:
        """K (after a fit with a range of K: the K chosen)."""
        return (self.state_ or {}).get("n_niches", self.params["n_niches"])

    # ------------------------------------------------------------------ embedding
    def _groups(self, adata: ad.AnnData) -> np.ndarray | None:
        bk = self.params["batch_key"]
        if bk is None:
            return None
        if bk not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{bk}"] (batch_key); pass batch_key= of an existing column')
        return adata.obs[bk].astype(str).to_numpy()

    def _embed(self, adata: ad.AnnData, fit: bool) -> np.ndarray:
        """(n_obs, d) batch-corrected expression embedding."""
        p = self.params
        groups = self._groups(adata)
        corr = p["batch_correction"]
        if p["feature_key"] is not None:
            if p["feature_key"] not in adata.obsm:
                raise StdistillError(f'AnnData has no obsm["{p["feature_key"]}"] (feature_key); compute it or pass feature_key=None')
            e = np.asarray(adata.obsm[p["feature_key"]], dtype=np.float32)
            if corr == "standardize":
                e = _standardize_by(e, groups)
            elif corr == "harmony":
                e = self._harmony(e, adata)
            elif corr == "scvi":
                raise StdistillError("batch_correction='scvi' computes its own latent; pass feature_key=None")
            else:
                e = _standardize_by(e, np.zeros(len(e)))
            return e
        if corr == "scvi":
            return self._scvi(adata, fit)
        if adata.n_vars == 0:
            raise StdistillError("AnnData has no genes: the niche teacher needs expression counts")
        if fit:
            genes = pd.Index(adata.var_names)
            logx = _log_norm(adata)
            sel_groups = groups if groups is not None else np.zeros(adata.n_obs)
            self.state_["genes"] = list(_select_genes(logx, genes, sel_groups, p["n_top_genes"], p["min_gene_frac"]))
            if len(self.state_["genes"]) < len(genes):  # else every gene, in order: logx as it is
                del logx  # the selected genes are made from the counts again: one sparse copy at a time
                logx = _log_norm(adata, pd.Index(self.state_["genes"]))
        else:
            logx = _log_norm(adata, pd.Index(self.state_["genes"]))
        e = self._project_pcs(logx, groups, fit)
        if corr == "harmony":
            e = self._harmony(e, adata)
        return e.astype(np.float32, copy=False)

    def _project_pcs(self, logx: sp.csr_matrix, groups: np.ndarray | None, fit: bool) -> np.ndarray:
        """(n_obs, n_pcs) float32 PCA of the standardized, clipped log-expression, projected in row
        blocks (:mod:`stdistill._pca`); the fit streams them too past ``_pca.IN_MEMORY_MB``, so at
        scale the dense (n_obs x genes) matrix is never built."""
        if self.params["batch_correction"] == "standardize":  # each group with its own moments
            parts = [(rows, *_sparse_moments(logx, rows)) for rows in _group_rows(groups)]
        else:  # global moments, fitted once
            every = np.arange(logx.shape[0])
            if fit:
                self.state_["gene_mean"], self.state_["gene_sd"] = _sparse_moments(logx, every)
            parts = [(every, self.state_["gene_mean"], self.state_["gene_sd"])]
        if fit:
            from ._consensus import fit_member_pcas, member_seeds

            p = self.params
            n_pcs = max(1, min(p["n_pcs"], logx.shape[1], logx.shape[0] - 1))
            members = p["consensus"] if p["method"] == "aggregate" and p["batch_correction"] != "harmony" else 1
            self.state_.update(embed_members=members, embed_width=n_pcs)
            self.state_["pca_mean"], self.state_["pca_components"] = fit_member_pcas(
                lambda rows: standardized_blocks(logx, parts if rows is None else [
                    (np.intersect1d(r, rows, assume_unique=True), mu, sd) for r, mu, sd in parts]),
                *logx.shape, n_pcs, p["pca_solver"], member_seeds(p["seed"], members))
        return project(standardized_blocks(logx, parts), self.state_["pca_mean"], self.state_["pca_components"],
                       logx.shape[0])

    def _harmony(self, e: np.ndarray, adata: ad.AnnData) -> np.ndarray:
        try:
            import harmonypy
        except ImportError:
            raise StdistillError("batch_correction='harmony' needs harmonypy: pip install harmonypy") from None
        meta = pd.DataFrame({"b": self._groups(adata)})
        ho = harmonypy.run_harmony(e, meta, ["b"], random_state=self.params["seed"], verbose=False)
        z = np.asarray(ho.Z_corr)
        return (z.T if z.shape[0] != e.shape[0] else z).astype(np.float32)

    def _scvi(self, adata: ad.AnnData, fit: bool) -> np.ndarray:
        try:
            import scvi
        except ImportError:
            raise StdistillError("batch_correction='scvi' needs scvi-tools: pip install 'stdistill[scvi]'") from None
        if not fit:
            raise StdistillError("an scVI teacher embeds only the data it was fitted on; refit on the new sections")
        p = self.params
        sub = ad.AnnData(X=sp.csr_matrix(adata.X), obs=pd.DataFrame({"b": self._groups(adata)}, index=adata.obs_names),
                         var=pd.DataFrame(index=adata.var_names))
        genes = _select_genes(_log_norm(sub), pd.Index(sub.var_names), sub.obs["b"].to_numpy(),
                              p["n_top_genes"], p["min_gene_frac"])
        sub = sub[:, genes].copy()
        scvi.settings.seed = p["seed"]
        scvi.model.SCVI.setup_anndata(sub, batch_key="b")
        model = scvi.model.SCVI(sub, n_latent=min(p["n_pcs"], 30))
        model.train(max_epochs=max(50, p["n_steps"] // 2), enable_progress_bar=False)
        return _standardize_by(np.asarray(model.get_latent_representation(), dtype=np.float32), sub.obs["b"].to_numpy())

    # ------------------------------------------------------------------ fit / predict
    def _radius(self, adata: ad.AnnData) -> float:
        p = self.params
        if p["radius_um"] is not None:
            return float(p["radius_um"])
        if p["method"] == "aggregate":
            return 1.5 * radius_for_neighbors(adata, 1)
        return radius_for_neighbors(adata, p["n_neighbors"])

    def _fit_embedding(self, adata: ad.AnnData) -> np.ndarray:
        """Seed, reset the state and fit the expression embedding (n_obs, d); K-independent."""
        seed_everything(self.params["seed"])
        if adata.n_obs < np.min(self.params["n_niches"]):
            raise StdistillError(f"{adata.n_obs} spots cannot hold {self.params['n_niches']} niches")
        self.state_, self.fit_agreement_ = {}, None
        e = self._embed(adata, fit=True)
        self.state_["radius_um"] = self._radius(adata)
        return e

    def fit(self, adata: ad.AnnData) -> NicheTeacher:
        """Fit on ``adata`` (any number of sections; images not needed). Returns self."""
        e = self._fit_embedding(adata)
        if self.params["method"] == "aggregate":
            from ._consensus import fit_mixture

            # the same rings give the fitted soft labels: no second graph
            self.state_["gmm"], self.fit_probs_ = fit_mixture(self, self._aggregate(adata, e))
        else:
            self._fit_nolan(adata, e)
            self.fit_probs_ = self._probs(adata, e)
        return self

    def _aggregate(self, adata: ad.AnnData, e: np.ndarray) -> np.ndarray:
        # the spot graph of obsp when one of this radius is there (pp.spatial_neighbors), else built here
        g = spot_graph(adata, self.state_["radius_um"], store=False)
        return aggregate(g, e, self.params["n_rings"]).astype(np.float64)

    def _views(self, adata: ad.AnnData, e: np.ndarray):
        r = self.state_["radius_um"]
        tok = neighbor_tokens(adata, r, max_neighbors=int(round(self.params["n_neighbors"] * 1.5)))
        d = np.linalg.norm(tok.offset_um, axis=-1)
        lmask = tok.mask & (d <= 0.75 * r)
        x = e[np.where(tok.mask, tok.index, 0)]
        x[~tok.mask] = 0
        return x.astype(np.float32), (tok.offset_um / r).astype(np.float32), tok.mask, lmask

    def _fit_nolan(self, adata: ad.AnnData, e: np.ndarray) -> None:
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        from .._lightning import make_trainer, quiet

        p = self.params
        x, off, gmask, lmask = self._views(adata, e)
        ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(off), torch.from_numpy(gmask), torch.from_numpy(lmask))
        g = torch.Generator().manual_seed(p["seed"])
        bs = min(p["batch_size"], len(ds))
        dl = DataLoader(ds, batch_size=bs, shuffle=True, generator=g, drop_last=len(ds) > bs)
        seed_everything(p["seed"])
        self._hp = dict(d_in=e.shape[1], n_niches=p["n_niches"], d_model=p["d_model"], tau=0.1, lr=2e-3,
                        sinkhorn_eps=0.05, token_drop=0.2, noise=0.1)
        model = _nolan_module(**self._hp)
        trainer = make_trainer(max_epochs=-1, max_steps=p["n_steps"], monitor=None, accelerator="cpu", devices=1,
                               enable_progress_bar=False)
        from .._threads import torch_threads

        with torch_threads(1), quiet():
            trainer.fit(model, dl)
        model.eval()
        self.state_["nolan"] = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        self.state_["nolan_hp"] = self._hp
        self._model = model

    def _nolan_model(self):
        import torch

        if getattr(self, "_model", None) is None:
            m = _nolan_module(**self.state_["nolan_hp"])
            m.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.state_["nolan"].items()})
            m.eval()
            self._model = m
        return self._model

    def _probs(self, adata: ad.AnnData, e: np.ndarray) -> np.ndarray:
        if self.params["method"] == "aggregate":
            return self.state_["gmm"].predict_proba(self._aggregate(adata, e)).astype(np.float32)
        import torch

        x, off, gmask, _ = self._views(adata, e)
        m = self._nolan_model()
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), 2048):
                s = m.scores(torch.from_numpy(x[i:i + 2048]), torch.from_numpy(off[i:i + 2048]), torch.from_numpy(gmask[i:i + 2048]))
                out.append(torch.softmax(s / self.state_["nolan_hp"]["tau"], -1).numpy())
        return np.concatenate(out).astype(np.float32)

    def _check_fitted(self):
        if self.state_ is None:
            raise StdistillError("NicheTeacher is not fitted: call .fit(adata) first")

    def predict_proba(self, adata: ad.AnnData) -> np.ndarray:
        """(n_obs, K) soft niche probabilities (rows sum to 1)."""
        self._check_fitted()
        return self._probs(adata, self._embed(adata, fit=False))

    def predict(self, adata: ad.AnnData, key_added: str = "niche", *, inplace: bool = True,
                copy: bool = False) -> ad.AnnData | np.ndarray | None:
        """Write ``obsm[f"{key_added}_probs"]`` (n_obs, K) and ``obs[key_added]`` (categorical "0".."K-1",
        the argmax). Returns None (``copy=True``: a new AnnData; ``inplace=False``: the probabilities)."""
        probs = self.predict_proba(adata)
        return deliver(adata, probs, lambda target: write_niches(target, probs, key_added), copy=copy, inplace=inplace)

    def fit_predict(self, adata: ad.AnnData, key_added: str = "niche", *, inplace: bool = True,
                    copy: bool = False) -> ad.AnnData | np.ndarray | None:
        """:meth:`fit` then write the fitted soft labels (see :meth:`predict`; the same return rule); with a
        range of K also ``uns[f"{key_added}_stability"]`` (the stability curve), with ``consensus`` > 1
        ``obs[f"{key_added}_agreement"]`` (share of members agreeing with each spot's niche)."""
        from ._consensus import record_fit

        probs = self.fit(adata).fit_probs_

        def write(target: ad.AnnData) -> None:
            write_niches(target, probs, key_added)
            record_fit(self, target, key_added)

        return deliver(adata, probs, write, copy=copy, inplace=inplace)

    def diagnostics(self, adata: ad.AnnData, key: str = "niche", patient_key: str = PATIENT_KEY) -> dict:
        """``{"nmi_patient": NMI(niche, patient), "sizes": DataFrame patients x niches (spots),
        "single_niche_patients": patients whose spots are >= 95% one niche, "patients_per_niche":
        :func:`~stdistill.metrics.niche_patients`}``."""
        from ..metrics import niche_patients, niche_sizes, nmi

        if key not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{key}"]; run teacher.predict(adata, key_added="{key}") first')
        niches = adata.obs[key].astype(str).to_numpy()
        pats = adata.obs[patient_key].astype(str).to_numpy()
        sizes = niche_sizes(niches, pats, categories=[str(i) for i in range(self.n_niches)])
        frac = sizes.div(sizes.sum(1), axis=0)
        return {"nmi_patient": nmi(pats, niches), "sizes": sizes,
                "single_niche_patients": list(frac.index[frac.max(1) >= 0.95]),
                "patients_per_niche": niche_patients(niches, pats, categories=sizes.columns)}

    # ------------------------------------------------------------------ persistence
    _bundle_format = _FORMAT

    def _bundle_parts(self) -> tuple[dict, dict, dict]:
        self._check_fitted()
        if self.params["batch_correction"] == "scvi":
            raise StdistillError("an scVI-based teacher cannot be saved; save its niches (obs/obsm) instead")
        arrays = {k: np.asarray(self.state_[k]) for k in _ARRAYS if k in self.state_}  # dtypes kept: same numbers
        if "gmm" in self.state_:
            from ._consensus import mixture_arrays

            arrays.update(mixture_arrays(self.state_["gmm"]))
        arrays.update({f"nolan.{k}": v for k, v in self.state_.get("nolan", {}).items()})
        cfg = {"params": self.params, "radius_um": self.state_["radius_um"], "genes": self.state_.get("genes"),
               "nolan_hp": self.state_.get("nolan_hp"), **{k: self.state_[k] for k in _STATE if k in self.state_}}
        rec = bundle_record("niche_teacher", outputs={"niches": [str(i) for i in range(self.n_niches)]},
                            training={"method": self.params["method"], "radius_um": self.state_["radius_um"]})
        return cfg, arrays, rec

    @classmethod
    def _from_bundle(cls, cfg, tensors, record, path, **_) -> NicheTeacher:
        params = dict(cfg["params"])
        params.setdefault("feature_key", params.pop("use_rep", None))  # saved before the rename
        t = cls(**params)
        t.state_ = {k: cfg[k] for k in ("radius_um", *_STATE) if k in cfg}
        t.state_.update({"genes": cfg["genes"]} if cfg.get("genes") is not None else {})
        k = t.n_niches
        check_shapes(tensors, {"pca_components?": ("c", "g"), "pca_mean?": ("g",), "gene_mean?": ("g",),
                               "gene_sd?": ("g",), "gmm.weights_?": (k,), "gmm.means_?": (k, "d"),
                               "gmm.covariances_?": None, "gmm.precisions_cholesky_?": None,
                               "consensus.maps?": ("r", k, k), "consensus.cols?": ("r", "f")}, path, "NicheTeacher")
        t.state_.update({n: tensors[n].numpy() for n in _ARRAYS if n in tensors})
        from ._consensus import member_seeds, mixture_from_arrays

        g = mixture_from_arrays({n: v.numpy() for n, v in tensors.items() if n.startswith(("gmm.", "consensus."))},
                                t.params["covariance_type"], member_seeds(t.params["seed"], t.params["consensus"]))
        if g is not None:
            t.state_["gmm"] = g
        nol = {n[len("nolan."):]: v for n, v in tensors.items() if n.startswith("nolan.")}
        if nol:
            t.state_["nolan"], t.state_["nolan_hp"] = {n: v.numpy() for n, v in nol.items()}, dict(cfg["nolan_hp"])
            t._model = _nolan_module(**t.state_["nolan_hp"])
            load_state(t._model, nol, path, "NicheTeacher")
            t._model.eval()
        return t
