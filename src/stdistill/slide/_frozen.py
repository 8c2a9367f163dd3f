"""Predictors of models that read frozen encoder features: HEST's probe (:class:`HestRidge`),
GenST, and survival students (AMKD's H&E-only student, ABMIL).

Each encodes the tiles as the training features were made (encoder, patch, precision, stain
normalisation: the bundle's features record), chunk by chunk and resumable, then:

- probe: expression of each tile (``{"genes": (n, G)}``);
- GenST: generated expression and its uncertainty, the mean over genes of the mixture SD over
  the predicted expression codes (``{"genes": (n, G), "uncertainty": (n, 1)}``);
- survival: one risk for the whole slide (all readable tiles as one bag), its group from the
  cut stored in the bundle, and each tile's attention (``{"attention": (n, 1)}``; risk and group
  in :attr:`Job.slide`).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from ._chunks import chunk_paths, load_chunk, run_stage
from ._models import Job, encode_features

#: survival model kinds that read the slide alone (the others need RNA or clinical columns)
SLIDE_KINDS = ("abmil", "student")


def _made(job: Job) -> dict:
    b = job.bundle
    return {"features": {**b.features, "size_um": b.size_um, "px": b.px}}


def _features(paths, chunks, a: int, e: int) -> np.ndarray:
    """Features of tiles [a, e) (one chunk's file)."""
    i = [c[0] for c in chunks].index(a)
    return load_chunk(paths[i], "features")


def _per_chunk(job: Job, stage: str, width: int, predict) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode, then ``predict(features of the readable tiles) -> (n_ok, width)`` chunk by chunk.
    Returns (n_tiles, width) predictions (NaN rows for unreadable tiles), the readable mask and
    the chunks reused."""
    _, paths, ok, reused = encode_features(job, _made(job))
    path = chunk_paths(job.out, stage)

    def compute(a, e):
        f = _features(paths, job.chunks, a, e)
        good = ok[a:e] & np.all(np.isfinite(f), axis=1)
        pred = np.full((e - a, width), np.nan, np.float32)
        if good.any():
            pred[good] = predict(f[good])
        return {"pred": pred}

    reused += run_stage(stage, job.chunks, path, compute, job.bar)
    return np.concatenate([load_chunk(path(i), "pred") for i in range(len(job.chunks))]), ok, reused


def predict_probe(job: Job) -> tuple[dict, np.ndarray, int]:
    """HEST's frozen probe: StandardScaler -> PCA -> ridge on each tile's features."""
    m = job.bundle.model
    pred, ok, reused = _per_chunk(job, "probe", len(m.genes_), m.predict)
    return {"genes": pred}, ok, reused


def predict_genst(job: Job) -> tuple[dict, np.ndarray, int]:
    """GenST: generated log1p expression and its uncertainty per tile."""
    m = job.bundle.model
    record = job.bundle.features

    def predict(f: np.ndarray) -> np.ndarray:
        sub = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(f))]))
        sub.obsm[m.feature_key] = f
        sub.uns[Key.uns.features] = {m.feature_key: record}
        m.predict(sub, key_added=Key.obsm.genst_pred, sd_key=Key.obsm.genst_sd)
        sd = sub.obsm[Key.obsm.genst_sd].to_numpy()
        return np.c_[sub.obsm[Key.obsm.genst_pred].to_numpy(), sd.mean(1)]

    pred, ok, reused = _per_chunk(job, "genst", len(m.genes_) + 1, predict)
    return {"genes": pred[:, :-1], "uncertainty": pred[:, -1:]}, ok, reused


def predict_survival(job: Job) -> tuple[dict, np.ndarray, int]:
    """A survival student: risk of the slide (all readable tiles as one bag), its group from the
    bundle's stored cut (``risk_cut_``; never the predicted cohort's median) and attention per tile."""
    from ..io._cohort import Cohort

    m = job.bundle.model
    _, paths, ok, reused = encode_features(job, _made(job))
    n = job.tiles.n_obs
    path = chunk_paths(job.out, "survival")

    def compute(a, e):
        X = np.concatenate([load_chunk(p, "features") for p in paths])
        good = ok & np.all(np.isfinite(X), axis=1)
        # one bag, one "patient"; time and event are placeholders that risk, group and attention never read
        c = Cohort(pd.DataFrame({"time": [0.0], "event": [0]}, index=["slide"]), {"slide": X[good]}, {"slide": "slide"})
        attn = np.full(n, np.nan, np.float32)
        attn[good] = m.attention(c)["slide"]
        risk = m.predict(c)
        high = m.predict_group(c, risk).iloc[0] == "high risk"
        return {"risk": np.array([risk.iloc[0]]), "high": np.array([int(high)]), "attention": attn}

    reused += run_stage("survival", [(0, n)], path, compute, job.bar)
    z = {k: load_chunk(path(0), k) for k in ("risk", "high", "attention")}
    job.slide.update({"risk": round(float(z["risk"][0]), 6), "risk_group": "high risk" if z["high"][0] else "low risk",
                      "risk_cut": float(m.risk_cut_)})
    return {"attention": z["attention"][:, None]}, ok, reused


def check_survival(bundle) -> None:
    """One line for a survival bundle that cannot run on a slide alone."""
    m = bundle.model
    if m.config.kind not in SLIDE_KINDS:
        raise StdistillError(f"a {m.config.kind!r} survival model needs RNA or clinical values; stdistill predict runs "
                             f"the H&E-only kinds ({', '.join(SLIDE_KINDS)}), e.g. AMKD's student", bundle.path)
    if m.risk_cut_ is None:
        raise StdistillError("the survival model stores no risk cut (risk_cut_): refit it with this version", bundle.path)
