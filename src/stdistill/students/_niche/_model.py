"""The niche student as an estimator: settings, fit (validation split, candidates, refinement,
refit), predict and its bundle. Data, training and selection live in ``_data``, ``_train`` and
``_select``."""

from __future__ import annotations

import os
from dataclasses import replace
from types import MappingProxyType

import anndata as ad
import numpy as np

from ..._api import deprecated, renamed_kwargs
from ..._errors import StdistillError
from ..._json import jsonable
from ..._keys import Key
from ..._niches import niche_names, write_niches
from ..._threads import torch_threads
from ..._utils import load_state
from ...bundle._format import bundle_record
from ...bundle._io import Bundled
from ._config import NicheStudentConfig
from ._data import NicheData
from ._select import NicheSelection
from ._train import make_net, train_net

__all__ = ["NicheStudent"]

_FORMAT = "stdistill.NicheStudent/1"
_ARRAYS = ("feat_mean", "feat_sd", "pca_mean", "pca_components", "ctx_feat_mean", "ctx_feat_sd", "ctx_pca_mean",
           "ctx_pca_components")


class NicheStudent(NicheData, NicheSelection, Bundled):
    """H&E-only niche model distilled from a teacher's soft labels (scikit-learn style).

    ``NicheStudent(config)`` takes a :class:`NicheStudentConfig` (keywords replace its fields);
    ``NicheStudent(n_niches, feature_key=..., ...)`` the same settings as keywords. ``params`` (a
    read-only dict of them) is deprecated: read ``config``.

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
    accelerator
        Where Lightning trains by default (``"cpu"``, ``"gpu"``, ``"auto"``; :meth:`fit` can override
        it). ``device`` is its old name (accepted for one release, with a ``DeprecationWarning``).
    connectivity_key
        ``obsp`` spot graph (squidpy's name): a graph the user supplied there (its record gives no
        radius in um, e.g. squidpy's) defines the neighbourhoods instead of ``radius_um``; without
        one, the tokens are the spots within ``radius_um`` (nearest first), as a radius graph of
        :func:`stdistill.pp.spatial_neighbors` would hold them.
    """

    @renamed_kwargs(device="accelerator")
    def __init__(self, config: NicheStudentConfig | int | None = None, **settings):
        if isinstance(config, NicheStudentConfig):
            self.config = replace(config, **settings)
        else:
            if config is not None and "n_niches" in settings:
                raise StdistillError("NicheStudent() got n_niches twice (positional and keyword)")
            self.config = NicheStudentConfig(**{"n_niches": config, **settings})
        self.net_ = None
        self.info_: dict = {}

    @property
    def params(self) -> MappingProxyType:
        """The settings as a read-only dict (``device`` is ``accelerator``). Deprecated: read ``config``."""
        deprecated("NicheStudent.params is now NicheStudent.config (a NicheStudentConfig)")
        return MappingProxyType({**self.config.as_dict(), "device": self.config.accelerator})

    def __repr__(self) -> str:
        c = self.config
        return f"NicheStudent(n_niches={c.n_niches}, feature_key={c.feature_key!r}, radius_um={c.radius_um})"

    def _train(self, arrays, train_idx: np.ndarray, val_idx: np.ndarray | None, epochs: int, seed: int,
               run_dir: str | os.PathLike | None = None, stage: str = "fit"):
        """One Lightning run under the current config (:func:`._train.train_net`)."""
        ro = getattr(self, "_run_opts", None) or dict(devices=1, strategy="auto", num_nodes=1,
                                                        accelerator=self.config.accelerator)
        return train_net(self.config, arrays, train_idx, val_idx, epochs, seed, run_opts=ro,
                         views=getattr(self, "_views_z", None), run_dir=run_dir, stage=stage,
                         resumed=getattr(self, "_resumed", None))

    # ------------------------------------------------------------------ fit
    def fit(self, adata: ad.AnnData, probs_key: str = Key.obsm.niche_probs, candidates: list[dict] | None = None,
            run_dir: str | os.PathLike | None = None, *, devices: int | str = 1, strategy: str = "auto",
            num_nodes: int = 1, accelerator: str | None = None) -> NicheStudent:
        """Train on spots with features and teacher probabilities ``obsm[probs_key]`` (n_obs, K).

        ``adata`` holds the training patients only (the caller splits by patient); the
        validation patient for early stopping is taken from among them.

        ``candidates``: optional list of settings overrides (e.g. ``[{"radius_um": 300},
        {"radius_um": 650}]``), chosen by :func:`stdistill.select.select`: each is trained on the
        training patients minus the validation patient and scored on the validation patient (best
        ``monitor`` value over epochs; with ``val_patients="each"`` every training patient
        validates in turn and the scores are averaged); the best is kept (ties: the first) and
        refitted. Settings are thus chosen inside the training patients only. The choice is
        ``selection_`` (a :class:`~stdistill.select.Selection`; ``info_["selection"]`` and the
        bundle's training record hold it as JSON); without candidates it records the early
        stopping. A candidate may name other features (``feature_key``, ``context_key``,
        ``views``: e.g. stain-normalised ones; see :func:`stdistill.recipes.niches.fit_transfer`).

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
        ``if __name__ == "__main__":``. ``accelerator=None``: the config's ``accelerator``.
        """
        self._resumed: list[str] = []
        self._run_opts = dict(devices=devices, strategy=strategy, num_nodes=int(num_nodes),
                              accelerator=accelerator or self.config.accelerator)
        probs = self._teacher_probs(adata, probs_key)
        self.net_ = None
        self._check_candidates(candidates)
        pats = adata.obs[Key.obs.patient].astype(str).to_numpy()
        has = np.all(np.isfinite(self._features(adata)), axis=1) & np.all(np.isfinite(probs), axis=1)
        train_pats = sorted(set(pats[has]))
        splitter, vp, block_spots = self._validation(adata, has, train_pats, rotate=bool(candidates))
        if splitter is not None:
            mod, arrays = self._fit_validated(adata, probs, candidates, splitter, (vp, block_spots), run_dir)
        else:
            if candidates:
                raise StdistillError("choosing among candidates needs a validation patient (>= 2 training patients) "
                                     "or, with one patient, val_block > 0")
            c = self.config
            arrays = self._prepare(adata, probs)
            mod = self._train(arrays, np.flatnonzero(arrays[-1]), None, c.max_epochs, c.seed, run_dir, "fit")
            self.info_.update(val_patients=[], best_epoch=c.max_epochs, refine={"method": "none"}, refine_selection=None)
        self._record_fit(adata, probs_key, train_pats, arrays[-1])
        self.net_ = mod.net.eval()
        return self

    def _teacher_probs(self, adata: ad.AnnData, probs_key: str) -> np.ndarray:
        """(n_obs, K) float32 ``obsm[probs_key]``, checked; sets ``n_niches`` when it was None."""
        if probs_key not in adata.obsm:
            raise StdistillError(f'AnnData has no obsm["{probs_key}"] (teacher soft labels); run NicheTeacher.predict first')
        probs = np.asarray(adata.obsm[probs_key], dtype=np.float32)
        if self.config.n_niches is None:
            self.config.n_niches = int(probs.shape[1])
        if probs.shape != (adata.n_obs, self.config.n_niches):
            raise StdistillError(f'obsm["{probs_key}"] has shape {probs.shape}, expected ({adata.n_obs}, '
                                 f"{self.config.n_niches})")
        return probs

    @staticmethod
    def _check_candidates(candidates: list[dict] | None) -> None:
        names = set(NicheStudentConfig.names())
        for c in candidates or []:
            bad = set(c) - names | ({"n_niches", "seed"} & set(c))
            if bad:
                raise StdistillError(f"candidate settings {sorted(bad)} cannot be chosen (not NicheStudent parameters)")

    def _record_fit(self, adata: ad.AnnData, probs_key: str, train_pats: list[str], ok: np.ndarray) -> None:
        """What the fit trained on: patients, sections, spots, the features' records, niche names."""
        c = self.config
        self.info_["resumed"] = list(self._resumed)
        self.info_["train_patients"] = train_pats
        self.info_["n_train_spots"] = int(ok.sum())
        self.info_["train_sections"] = sorted(set(adata.obs[Key.obs.section].astype(str)[ok]))
        made = adata.uns.get(Key.uns.features, {})
        self.info_["features"] = jsonable(dict(made.get(c.feature_key, {})))
        if c.context_key:
            self.info_["context_features"] = jsonable(dict(made.get(c.context_key, {})))
        names = niche_names(adata, probs_key[: -len("_probs")]) if probs_key.endswith("_probs") else None
        if names is not None and len(names) == c.n_niches:
            self.info_["niche_names"] = names

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
        ck = self.config.context_key
        if ck and ck not in adata.obsm and extract:
            self._extract_missing(adata, ck, "context_features")
        if ck and ck in adata.obsm:
            self._check_stain(adata, ck, "context_features")
        f, ok = self._normalise(adata, f, fit=False, stats=stats)
        index, offset, mask = self._tokens(adata, ok, self.info_["max_neighbors"])
        f, index, offset, mask = self._with_context(adata, f, ok, index, offset, mask, fit=False, stats=stats,
                                                    context_stats=context_stats)
        out = np.full((adata.n_obs, self.config.n_niches), np.nan, dtype=np.float32)
        rows = np.flatnonzero(ok)
        ft, it, ot, mt = (torch.from_numpy(a) for a in (f, index, offset, mask))
        with torch.inference_mode(), torch_threads(self.config.num_threads):
            for s in range(0, len(rows), batch_size):
                r = torch.from_numpy(rows[s:s + batch_size])
                m = mt[r]
                x = ft[it[r].clamp_min(0)] * m.unsqueeze(-1)
                out[rows[s:s + batch_size]] = torch.softmax(self.net_(x, ot[r], m), -1).numpy()
        return out

    def predict(self, adata: ad.AnnData, key_added: str = Key.obs.niche_pred, extract: bool = True,
                refine: str | None = None, refine_kwargs: dict | None = None, *, inplace: bool = True,
                copy: bool = False) -> ad.AnnData | np.ndarray | None:
        """Write ``obs[key_added]`` (categorical "0".."K-1") and ``obsm[f"{key_added}_probs"]`` (n_obs, K).

        The default key differs from the teacher's ``"niche"``, so predicting on the teacher's
        file never overwrites its labels. ``refine`` (``"auto"``: the refinement chosen on the
        validation patient at fit, ``info_["refine"]``; or ``"none"``, ``"propagate"``, ``"gmm"``,
        ``"both"`` with ``refine_kwargs``): also refine them with each section's own structure
        (:func:`stdistill.students.refine_niches`, label-free, H&E only; the spot graph under
        ``connectivity_key``) into ``obs[key_added + "_refined"]`` / ``obsm[key_added +
        "_refined_probs"]``; the raw ones stay.

        Returns None (the return rule of :mod:`stdistill.keys`); ``copy=True``: a new AnnData with
        the keys; ``inplace=False``: the raw (n_obs, K) probabilities, nothing written.

        .. versionchanged:: returns None when it writes (it returned the probabilities too).
        """
        if copy and not inplace:
            raise StdistillError("copy=True writes into a copy and inplace=False writes nothing: pass one of them")
        target = adata.copy() if copy else adata
        probs = self.predict_proba(target, extract=extract)
        if not inplace:
            return probs
        write_niches(target, probs, key_added)
        if refine:
            self._refine(target, key_added, refine, refine_kwargs)
        return target if copy else None

    def _refine(self, adata: ad.AnnData, key_added: str, refine: str, refine_kwargs: dict | None) -> None:
        from .._refine import refine_niches, resolve_refinement

        c = self.config
        kw = {"feature_key": c.feature_key, "seed": c.seed, "connectivity_key": c.connectivity_key}
        if refine == "auto":
            kw.update(self.info_.get("refine") or {"method": "none"})
        else:
            kw["method"] = refine
        kw.update(refine_kwargs or {})
        kw = resolve_refinement(kw, self.info_.get("radius_um"))
        refine_niches(adata, Key.obsm.probs(key_added), key_added=Key.obs.refined(key_added), **kw)

    # ------------------------------------------------------------------ persistence
    _bundle_format = _FORMAT

    def bundle_record(self) -> dict:
        """The ``"bundle"`` entry of the saved config (see :mod:`stdistill.bundle`); its training
        record holds the choices made on the validation split (``selection``, ``refine_selection``)."""
        self._check_fitted()
        c, made = self.config, self.info_.get("features") or {}
        return bundle_record(
            "niches", features=made, encoder=made.get("encoder", c.encoder), size_um=made.get("size_um", c.size_um),
            px=made.get("px", c.px), feature_norm=c.feature_norm,
            outputs={"niches": self.info_.get("niche_names") or [str(i) for i in range(c.n_niches)]},
            training={key: self.info_.get(key) for key in ("train_patients", "train_sections", "n_train_spots",
                                                           "val_patients", "best_epoch", "radius_um", "refine",
                                                           "transfer", "selection", "refine_selection")},
        )

    def _bundle_parts(self) -> tuple[dict, dict, dict]:
        """(config, tensors, record) for :func:`stdistill.bundle.save_bundle`."""
        self._check_fitted()
        tensors = dict(self.net_.state_dict())
        for k in _ARRAYS:
            if k in self.info_:
                tensors[f"_norm.{k}"] = np.asarray(self.info_[k])  # dtype kept: same numbers after load
        info = {k: v for k, v in self.info_.items() if k not in _ARRAYS}
        return {"params": self.config.as_dict(), "info": info}, tensors, self.bundle_record()

    @classmethod
    def _from_bundle(cls, cfg, tensors, record, path, *, device: str = "cpu", **_) -> NicheStudent:
        params = {k: v for k, v in cfg["params"].items() if k != "device"}  # older bundles say device
        s = cls(NicheStudentConfig.from_saved(dict(params, accelerator=device), path))
        s.info_ = dict(cfg["info"])
        for k in _ARRAYS:
            t = tensors.pop(f"_norm.{k}", None)
            if t is not None:
                s.info_[k] = t.numpy()
        net = make_net(s.config, int(cfg["info"]["d_in"]))
        load_state(net, tensors, path, "NicheStudent")
        s.net_ = net.eval()
        return s
