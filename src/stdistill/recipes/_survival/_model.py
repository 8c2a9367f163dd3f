"""``SurvivalModel``: one estimator for every survival net (baselines, AMKD teacher and student).

``fit`` learns everything that depends on data from the cohort it is given (the training
patients): time bins, gene families present, gene and clinical standardisation. ``predict`` on a
student reads bags only; the RNA table is never touched.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pandas as pd
import torch

from ..._errors import StdistillError
from ..._threads import torch_threads
from ..._utils import load_state, seed_everything
from ...bundle import Bundled
from ...io._cohort import Cohort
from ._losses import fit_time_bins, time_to_bin
from ._module import Arrays, Collate, SurvivalModule, predict_arrays
from ._nets import KINDS, USES_BAG, USES_GENES, build_net

FORMAT = "stdistill.SurvivalModel/2"
_ARRAYS = ("gene_mean_", "gene_sd_", "clin_mean_", "clin_sd_", "feat_mean_", "feat_sd_", "feat_proj_")


@dataclass
class SurvivalConfig:
    """Settings of one survival model.

    ``kind``: ``"abmil"`` (pathology only), ``"snn"`` (genomics only), ``"late_fusion"``, ``"gge"``
    (AMKD's teacher: gene-guided enhancement), ``"student"`` (AMKD's H&E-only student; needs a
    fitted teacher), ``"clinical"`` (linear head on the ``clinical`` columns).
    ``loss``: ``"nll"`` (discrete time, ``n_bins`` bins fitted on the training events, MCAT's
    ``alpha``) or ``"cox"`` (partial likelihood). Student terms: ``w_feat`` (feature distillation
    to the teacher's enhanced pathology feature), ``w_rr`` (redundancy reduction) with
    ``rr_weight`` ``"adaptive"`` (disagreeing samples weighted up), ``"adaptive_down"`` (weighted
    down) or ``"fixed"``, ``rr_form`` ``"batch"`` (cross-correlation of the batch over all ``dim``
    dimensions, off-diagonal weight ``rr_offdiag``) or ``"whitened"`` (over the batch and the last
    ``rr_queue`` rows of earlier batches, on the teacher's ``rr_dim`` leading whitened principal
    directions: a reachable target), ``w_logit`` (plain KD).
    ``standardize_features``: z-score each instance feature with the training instances' mean/sd;
    ``pca``: then project onto that many principal components of the training instances.
    ``patience`` and ``maximize`` let :func:`stdistill.select.choose` pick ``max_epochs``.
    ``num_threads``: torch CPU threads while fitting and predicting (restored afterwards); these
    nets are small, and one thread avoids thread contention (100x slower steps on a busy machine);
    ``None`` keeps torch's setting.
    """

    kind: str = "abmil"
    loss: str = "nll"
    n_bins: int = 4
    alpha: float = 0.0
    dim: int = 64
    dropout: float = 0.25
    lr: float = 5e-4
    weight_decay: float = 1e-3
    batch_size: int = 16
    max_epochs: int = 20
    max_instances: int | None = 1024
    standardize_features: bool = True
    pca: int | None = None
    genesets: str = "hallmark"
    min_genes: int = 5
    rna_log1p: bool = False
    clinical: tuple[str, ...] = ()
    w_feat: float = 1.0
    w_rr: float = 1.0
    rr_weight: str = "adaptive"
    rr_offdiag: float = 0.05
    rr_form: str = "batch"
    rr_dim: int = 16
    rr_queue: int = 64
    w_logit: float = 0.0
    seed: int = 0
    patience: int = 10**6
    maximize: bool = True
    accelerator: str = "cpu"
    num_threads: int | None = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StdistillError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.loss not in ("nll", "cox"):
            raise StdistillError(f"loss must be 'nll' or 'cox', got {self.loss!r}")
        if self.rr_weight not in ("adaptive", "adaptive_down", "fixed"):
            raise StdistillError(f"rr_weight must be 'adaptive', 'adaptive_down' or 'fixed', got {self.rr_weight!r}")
        if self.rr_form not in ("batch", "whitened"):
            raise StdistillError(f"rr_form must be 'batch' or 'whitened', got {self.rr_form!r}")
        if self.rr_queue < 0:
            raise StdistillError(f"rr_queue must be >= 0, got {self.rr_queue}")
        if self.kind == "clinical" and not self.clinical:
            raise StdistillError("kind='clinical' needs the clinical columns (clinical=[...])")
        self.clinical = tuple(self.clinical)
        for k in ("batch_size", "dim", "n_bins", "rr_dim"):
            if getattr(self, k) < 1:
                raise StdistillError(f"{k} must be >= 1, got {getattr(self, k)}")

    @property
    def n_out(self) -> int:
        return 1 if self.loss == "cox" else self.n_bins


def _standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.nanmean(X, axis=0)
    sd = np.nanstd(X, axis=0)
    return mean, np.where(sd > 1e-8, sd, 1.0)


class SurvivalModel(Bundled):
    """A survival net as an estimator: ``fit(cohort)``, ``predict(cohort)`` -> risk per patient.

    Parameters
    ----------
    config
        :class:`SurvivalConfig` (fields can also be given as keyword arguments).
    """

    def __init__(self, config: SurvivalConfig | None = None, **kw):
        self.config = SurvivalConfig(**{**(asdict(config) if config else {}), **kw})
        self.net_ = None
        self.history_: list[dict] = []
        self.risk_cut_: float | None = None

    def __repr__(self) -> str:
        state = "fitted" if self.net_ is not None else "not fitted"
        return f"SurvivalModel(kind={self.config.kind!r}, loss={self.config.loss!r}, {state})"

    # ------------------------------------------------------------------ inputs
    def _fit_genes(self, cohort: Cohort, genesets) -> None:
        """Gene families of ``genesets`` present (>= ``min_genes`` varying genes) in ``cohort.rna``."""
        from ...pp._pathways import genesets as load_sets

        cfg = self.config
        R = self._rna(cohort, fitted=False)
        if len(R) < 2:
            raise StdistillError(f"a {cfg.kind!r} model needs >= 2 training patients with an RNA profile, got {len(R)}")
        var = R.std(axis=0, skipna=False) > 1e-8  # genes with a missing value in training are left out
        present = set(R.columns[var.to_numpy()])
        net = load_sets(genesets if genesets is not None else cfg.genesets)
        groups = {}
        for src, tgt in net.groupby("source", sort=False)["target"]:
            g = [x for x in dict.fromkeys(tgt.astype(str)) if x in present]
            if len(g) >= cfg.min_genes:
                groups[str(src)] = g
        if not groups:
            raise StdistillError(f"no gene family has >= {cfg.min_genes} varying genes of the RNA table "
                                 f"(columns e.g. {list(R.columns[:3])}; gene symbols expected)")
        self.genes_ = list(dict.fromkeys(g for gs in groups.values() for g in gs))
        pos = {g: i for i, g in enumerate(self.genes_)}
        self.groups_ = {k: [pos[g] for g in v] for k, v in groups.items()}
        self.gene_mean_, self.gene_sd_ = _standardise(R[self.genes_].to_numpy(np.float64))

    def _rna(self, cohort: Cohort, fitted: bool = True, allow_missing: bool = False) -> pd.DataFrame:
        """The RNA table (log1p'd if configured). Before fitting: the patients with a profile only
        (rows not all missing). Fitted: the model's genes for every patient; a patient missing any
        of them is an error unless ``allow_missing`` (its row then holds NaN)."""
        if cohort.rna is None:
            raise StdistillError(f"a {self.config.kind!r} model needs the RNA table (cohort.rna is None)")
        R = cohort.rna if not self.config.rna_log1p else np.log1p(cohort.rna.clip(lower=0))
        if not fitted:
            return R.loc[~R.isna().all(axis=1).to_numpy()]  # patients without a profile are left out
        missing = [g for g in self.genes_ if g not in R.columns]
        if missing:
            raise StdistillError(f"the RNA table lacks {len(missing)} of the model's genes (e.g. {missing[:3]})")
        R = R[self.genes_]
        bad = R.isna().any(axis=1)
        if bad.any() and not allow_missing:
            raise StdistillError(f"{int(bad.sum())} patients have no (complete) RNA profile (e.g. {list(R.index[bad])[:3]})")
        return R

    def _with_rna(self, cohort: Cohort, what: str) -> Cohort:
        """``cohort`` restricted to the patients with a complete profile over the model's genes
        (a genomic model trains and validates on these; ``what`` names the patients in errors)."""
        if cohort.rna is None:
            raise StdistillError(f"a {self.config.kind!r} model needs the RNA table (cohort.rna is None)")
        ok = ~self._rna(cohort, allow_missing=True).isna().any(axis=1).to_numpy()
        if ok.sum() < 2:
            raise StdistillError(f"a {self.config.kind!r} model needs >= 2 {what} with an RNA profile, got {int(ok.sum())}")
        return cohort if ok.all() else cohort.subset(np.asarray(cohort.patients)[ok])

    def _clin(self, cohort: Cohort) -> np.ndarray:
        cols = list(self.config.clinical)
        missing = [c for c in cols if c not in cohort.table.columns]
        if missing:
            raise StdistillError(f"clinical columns missing from the cohort table: {missing}")
        X = cohort.table[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        return X

    def _bag(self, cohort: Cohort, patient: str) -> np.ndarray:
        b = cohort.bag(patient)
        if b.shape[1] != self.d_in_:
            raise StdistillError(f"patient {patient!r}: features have d={b.shape[1]}, the model expects {self.d_in_}")
        t = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
        if getattr(self, "feat_mean_", None) is not None:
            t = (t - torch.from_numpy(self.feat_mean_)) / torch.from_numpy(self.feat_sd_)
        if getattr(self, "feat_proj_", None) is not None:
            t = t @ torch.from_numpy(self.feat_proj_)
        return t.numpy()

    def _arrays(self, cohort: Cohort, teacher: SurvivalModel | None = None) -> Arrays:
        """Inputs of ``cohort`` for this model (genes: the teacher's for a student)."""
        kind = self.config.kind
        src = teacher if teacher is not None else self  # a student feeds its teacher the teacher's inputs
        bags = [torch.from_numpy(src._bag(cohort, p)) if kind in USES_BAG or teacher is not None
                else torch.zeros(1, self._d_net) for p in cohort.patients]
        genes = None
        src = teacher if teacher is not None else (self if kind in USES_GENES else None)
        has_rna = None
        if src is not None:  # a student's patients may lack RNA: zeros, flagged, kept out of distillation
            G = (src._rna(cohort, allow_missing=teacher is not None).to_numpy(np.float64) - src.gene_mean_) / src.gene_sd_
            ok = ~np.isnan(G).any(axis=1)
            G[~ok] = 0.0
            genes = torch.from_numpy(G.astype(np.float32))
            has_rna = None if ok.all() else torch.from_numpy(ok)
        clin = None
        if kind == "clinical":
            C = (self._clin(cohort) - self.clin_mean_) / self.clin_sd_
            clin = torch.from_numpy(np.nan_to_num(C, nan=0.0).astype(np.float32))  # missing -> the training mean
        y = time_to_bin(cohort.time, self.bins_) if self.config.loss == "nll" else np.zeros(len(cohort.patients), int)
        return Arrays(bags, genes, clin, torch.from_numpy(y), torch.from_numpy(cohort.event.astype(np.float32)),
                      torch.from_numpy(cohort.time.astype(np.float32)), has_rna)

    # ------------------------------------------------------------------ fit
    def _check_teacher(self, teacher: SurvivalModel | None) -> None:
        cfg = self.config
        if cfg.kind != "student":
            if teacher is not None:
                raise StdistillError(f"only kind='student' takes a teacher (this is {cfg.kind!r})")
            return
        if teacher is None or teacher.net_ is None:
            raise StdistillError("a student needs a fitted teacher (SurvivalModel(kind='gge' or 'late_fusion').fit(...))")
        if teacher.config.kind not in ("gge", "late_fusion"):
            raise StdistillError(f"the teacher must be multimodal ('gge' or 'late_fusion'), got {teacher.config.kind!r}")
        if teacher.config.dim != cfg.dim or teacher.config.loss != cfg.loss:
            raise StdistillError("teacher and student must share dim and loss "
                                 f"(teacher {teacher.config.dim}/{teacher.config.loss}, student {cfg.dim}/{cfg.loss})")

    def _fit_inputs(self, cohort: Cohort, genesets, teacher: SurvivalModel | None = None) -> None:
        cfg = self.config
        if len(cohort.patients) < 2 or cohort.event.sum() < 1:
            raise StdistillError(f"training needs >= 2 patients and >= 1 event, got {len(cohort.patients)} / {int(cohort.event.sum())}")
        self.d_in_ = cohort.n_features
        self.features_ = cohort.meta.get("features_record")  # how the instance features were made, when known
        if cfg.kind in USES_BAG and self.d_in_ == 0:
            raise StdistillError(f"a {cfg.kind!r} model needs slide features (the cohort has no bags)")
        self.bins_ = fit_time_bins(cohort.time, cohort.event, cfg.n_bins) if cfg.loss == "nll" else np.array([-np.inf, np.inf])
        self._fit_features(cohort, teacher)
        self.genes_, self.groups_ = [], {}
        if cfg.kind in USES_GENES:
            self._fit_genes(cohort, genesets)
        if cfg.kind == "clinical":
            self.clin_mean_, self.clin_sd_ = _standardise(self._clin(cohort))

    def _fit_features(self, cohort: Cohort, teacher: SurvivalModel | None) -> None:
        """Instance standardisation (and PCA) from the training instances; a student copies its teacher's."""
        cfg = self.config
        self.feat_mean_ = self.feat_sd_ = self.feat_proj_ = None
        if teacher is not None:  # student and teacher read the same instances
            self.feat_mean_, self.feat_sd_, self.feat_proj_ = teacher.feat_mean_, teacher.feat_sd_, teacher.feat_proj_
            return
        if cfg.kind not in USES_BAG or not (cfg.standardize_features or cfg.pca):
            return
        X = torch.from_numpy(np.concatenate([cohort.bag(p) for p in cohort.patients])).double()
        m, sd = X.mean(0), X.std(0, unbiased=False)
        if not cfg.standardize_features:
            m, sd = torch.zeros_like(m), torch.ones_like(sd)
        sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
        self.feat_mean_, self.feat_sd_ = m.float().numpy(), sd.float().numpy()
        if cfg.pca:  # torch (one thread here): numpy's BLAS threads can stall for minutes on a busy machine
            g = torch.Generator().manual_seed(cfg.seed)
            Z = (X[torch.randperm(len(X), generator=g)[:50000]] - m) / sd
            Z = Z - Z.mean(0)
            _, vec = torch.linalg.eigh(Z.T @ Z)  # ascending eigenvalues
            k = min(cfg.pca, vec.shape[1])
            self.feat_proj_ = vec[:, -k:].flip(1).float().contiguous().numpy()  # (d, k), largest first

    @property
    def _d_net(self) -> int:
        return self.d_in_ if getattr(self, "feat_proj_", None) is None else int(self.feat_proj_.shape[1])

    def _build(self):
        cfg = self.config
        return build_net(cfg.kind, d_in=self._d_net, n_out=cfg.n_out, dim=cfg.dim, dropout=cfg.dropout,
                         groups=list(self.groups_.values()), n_clin=len(cfg.clinical))

    def fit(self, cohort: Cohort, *, teacher: SurvivalModel | None = None, val: Cohort | None = None,
            genesets=None) -> SurvivalModel:
        """Train on ``cohort`` (the training patients only) for ``config.max_epochs`` epochs.

        ``teacher``: a fitted multimodal model (students only; frozen). ``val``: patients scored with
        Harrell's C-index after every epoch (epoch 0 = untrained) into ``history_`` (choosing
        settings; never the test patients). ``genesets``: gene families (a name, file or
        source/target DataFrame; default ``config.genesets``).

        Patients without an RNA profile (all-missing rows of ``cohort.rna``, or patients absent from
        it): a genomic model (``snn``, ``late_fusion``, ``gge``) trains on the others (its time bins
        and instance statistics still come from every training patient); a student trains its
        pathology path and survival head on every patient, and only those with RNA enter the
        distillation terms. ``n_missing_rna_`` counts them. ``risk_cut_``: the median risk of the
        training patients (in-sample, after training), the cut of :meth:`predict_group`.
        """
        cfg, t0 = self.config, time.time()
        self._check_teacher(teacher)
        with torch_threads(cfg.num_threads):
            self._fit(cohort, teacher, val, genesets)
        self.fit_seconds_ = round(time.time() - t0, 2)
        return self

    def _fit(self, cohort: Cohort, teacher: SurvivalModel | None, val: Cohort | None, genesets) -> None:
        from torch.utils.data import DataLoader

        from ..._lightning import make_trainer, quiet

        cfg = self.config
        seed_everything(cfg.seed)
        self._fit_inputs(cohort, genesets, teacher)  # bins and instance statistics: every training patient
        train = self._with_rna(cohort, "training patients") if cfg.kind in USES_GENES else cohort
        arrays = self._arrays(train, teacher)
        self.n_missing_rna_ = (len(cohort.patients) - len(train.patients) if teacher is None
                               else 0 if arrays.has_rna is None else int((~arrays.has_rna).sum()))
        if arrays.has_rna is not None and not bool(arrays.has_rna.any()):
            raise StdistillError("no training patient has an RNA profile: the student has nothing to distil")
        net = self._build()
        score = None
        if val is not None:
            from ...metrics import cindex

            if cfg.kind in USES_GENES:
                val = self._with_rna(val, "validation patients")
            varr = self._arrays(val)
            score = (lambda n: cindex(val.time, val.event, predict_arrays(n, varr, cfg.loss)["risk"]))  # noqa: E731
        module = SurvivalModule(net, asdict(cfg), teacher=None if teacher is None else teacher.net_, score=score)
        n = len(arrays)
        bs = min(cfg.batch_size, n)
        g = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(list(range(n)), batch_size=bs, shuffle=True, generator=g, drop_last=n % bs == 1,
                            collate_fn=Collate(arrays, cfg.max_instances, train=True))
        self.history_ = [{"epoch": 0, "val_cindex": float(score(net))}] if score is not None else []
        if cfg.max_epochs > 0:
            trainer = make_trainer(max_epochs=cfg.max_epochs, monitor=None, accelerator=cfg.accelerator, devices=1,
                                   num_sanity_val_steps=0, enable_progress_bar=False)
            with quiet():
                trainer.fit(module, loader)
            self.history_ += module.history
        self.net_ = net.eval()
        self.risk_cut_ = float(np.median(predict_arrays(net, arrays, cfg.loss)["risk"]))

    # ------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if self.net_ is None:
            raise StdistillError("the model is not fitted: call fit() or SurvivalModel.load()")

    def _predict(self, cohort: Cohort) -> dict:
        self._check_fitted()
        with torch_threads(self.config.num_threads):
            return predict_arrays(self.net_, self._arrays(cohort), self.config.loss)

    def predict(self, cohort: Cohort) -> pd.Series:
        """(n_patients,) risk (higher = earlier event), indexed by patient. A student or ABMIL reads
        the bags only; genomic models read ``cohort.rna``."""
        return pd.Series(self._predict(cohort)["risk"], index=pd.Index(cohort.patients, name="patient"), name="risk")

    def predict_group(self, cohort: Cohort, risk: pd.Series | None = None) -> pd.Series:
        """(n_patients,) ``"high risk"`` where the risk is above ``risk_cut_`` (the median risk of the
        training patients, stored by :meth:`fit`), else ``"low risk"``. The cut never depends on
        ``cohort``, so a single new slide gets the same group as it would in any cohort. ``risk``:
        :meth:`predict`'s output for ``cohort`` when already computed (not predicted again)."""
        if self.risk_cut_ is None:
            raise StdistillError("the model has no stored risk cut (risk_cut_): refit it with this version")
        r = self.predict(cohort) if risk is None else risk
        return pd.Series(np.where(r.to_numpy() > self.risk_cut_, "high risk", "low risk"), index=r.index, name="group")

    def predict_survival(self, cohort: Cohort) -> pd.DataFrame:
        """Patients x time bins: S(bin end) of the discrete-time model (``loss="nll"`` only)."""
        if self.config.loss != "nll":
            raise StdistillError("survival curves need loss='nll' (a Cox model gives relative risks only)")
        lg = torch.from_numpy(self._predict(cohort)["logits"])
        S = torch.cumprod(1 - torch.sigmoid(lg), dim=1).numpy()
        cols = [f"<{e:g}" if np.isfinite(e) else "rest" for e in self.bins_[1:]]
        return pd.DataFrame(S, index=pd.Index(cohort.patients, name="patient"), columns=cols)

    def embed(self, cohort: Cohort) -> np.ndarray:
        """(n_patients, dim) float32: the net's ``emb`` (students: their pooled slide embedding)."""
        return self._predict(cohort)["emb"]

    def attention(self, cohort: Cohort) -> dict[str, np.ndarray]:
        """``{slide: (n_instances,) attention}`` (each patient's weights sum to 1 over its slides)."""
        out = self._predict(cohort)["attn"]
        if all(a is None for a in out):
            raise StdistillError(f"a {self.config.kind!r} model has no attention over instances")
        res = {}
        for p, a in zip(cohort.patients, out):
            start = 0
            for s in cohort.slides_of(p):
                n = len(cohort.bags[s])
                res[s] = a[start : start + n]
                start += n
        return res

    # ------------------------------------------------------------------ save / load (a bundle; see stdistill.bundle)
    _bundle_format = FORMAT

    def _bundle_parts(self) -> tuple[dict, dict, dict]:
        """(config, tensors, record): weights, bins, standardisation; ``config.kind`` says AMKD student/teacher."""
        from ...bundle import bundle_record

        self._check_fitted()
        tensors = {f"net.{k}": v for k, v in self.net_.state_dict().items()}
        tensors["bins"] = np.asarray(self.bins_, dtype=np.float64)
        tensors.update({k: getattr(self, k) for k in _ARRAYS if getattr(self, k, None) is not None})  # dtypes kept
        cfg = {"config": {**asdict(self.config), "clinical": list(self.config.clinical)}, "d_in": int(self.d_in_),
               "genes": list(self.genes_), "groups": self.groups_, "history": self.history_, "risk_cut": self.risk_cut_}
        rec = bundle_record("survival", features=getattr(self, "features_", None), outputs={"risk": ["risk"]},
                            feature_norm="z-score" + (f" + PCA({self.config.pca})" if self.config.pca else "")
                            if self.feat_mean_ is not None else None,
                            training={"kind": self.config.kind, "loss": self.config.loss,
                                      "fit_seconds": getattr(self, "fit_seconds_", None)})
        return cfg, tensors, rec

    @classmethod
    def _from_bundle(cls, meta, tensors, record, path, **_) -> SurvivalModel:
        known = {f.name for f in fields(SurvivalConfig)}
        m = cls(SurvivalConfig(**{k: v for k, v in meta["config"].items() if k in known}))
        m.d_in_, m.genes_, m.groups_, m.history_ = int(meta["d_in"]), list(meta["genes"]), dict(meta["groups"]), meta["history"]
        m.risk_cut_ = None if meta.get("risk_cut") is None else float(meta["risk_cut"])  # absent in older models
        m.bins_, m.features_ = tensors.pop("bins").numpy(), record.get("features")
        m.feat_mean_ = m.feat_sd_ = m.feat_proj_ = None
        for k in _ARRAYS:
            if k in tensors:
                setattr(m, k, tensors.pop(k).numpy())
        net = m._build()
        load_state(net, {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, path, "survival model")
        m.net_ = net.eval()
        return m
