"""Survival cohorts with known ground truth, for the AMKD recipe. Both are **semi-synthetic
or simulated**: no real patient outcome is involved.

- :func:`her2st_survival` (**semi-synthetic, from real data**): each "patient" is a random
  circular window of a real HER2ST section with an H&E image (A1, A2, B4, C2-C5). Its bag holds
  the real patch features of the window's spots (``features.extract``, cached); its genomic
  profile is the pseudo-bulk of the same spots' real counts. Event times are drawn from a hazard
  that depends on a hidden pathway activity of that pseudo-bulk (default: proliferation
  ``HALLMARK_E2F_TARGETS`` raises it, ``HALLMARK_INTERFERON_GAMMA_RESPONSE`` lowers it; a planted
  rule, not a biological claim), plus random censoring. Checked here: the interferon activity of a
  window is largely predictable from its image features, E2F much less, so the image carries part
  of the risk. Windows of one source patient (A, B, C) overlap; keep them on one side of every split
  (``patient_folds(cohort, groups="source_patient")``).
- :func:`simulated_survival` (**fully simulated**, the positive control): one small
  :func:`~stdistill.datasets.simulated` section per patient; the hazard follows the planted
  cell-type programmes (tumour_B share raises it, lymphocytes lower it). tumour_A and tumour_B
  look alike in the image, so again only part of the risk is visible.

The true log-hazard is ``table["hazard_true"]`` (its C-index on test patients is the ceiling).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import StdistillError
from .._keys import Key
from ..io._cohort import Cohort
from ..io._section import SECTION_KEY, sections, spatial_um

RISK_PATHWAYS = {"HALLMARK_E2F_TARGETS": 1.0, "HALLMARK_INTERFERON_GAMMA_RESPONSE": -1.0}
ENCODER = "effnet-lite0-imagenet"


def draw_times(log_hazard: np.ndarray, censoring: float, base_rate: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exponential event times with rate ``base_rate * exp(log_hazard)`` and independent exponential
    censoring whose rate gives an expected censored share of ``censoring``. Returns (time, event)."""
    lam = base_rate * np.exp(np.asarray(log_hazard, dtype=np.float64))
    T = rng.exponential(1.0 / lam)
    if censoring <= 0:
        return T, np.ones(len(T), dtype=np.int64)
    if not 0 < censoring < 1:
        raise StdistillError(f"censoring must be in [0, 1), got {censoring}")
    lo, hi = np.log(lam.min()) - 20, np.log(lam.max()) + 20  # P(C < T) = mean(mu / (mu + lam)) is monotone in mu
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(np.exp(mid) / (np.exp(mid) + lam)) < censoring else (lo, mid)
    C = rng.exponential(1.0 / np.exp((lo + hi) / 2), len(T))
    return np.minimum(T, C), (T <= C).astype(np.int64)


def _zscore(v: np.ndarray) -> np.ndarray:
    sd = v.std()
    return (v - v.mean()) / (sd if sd > 0 else 1.0)


def _windows(spots: ad.AnnData, n_per_patient: int, radius_um: tuple[float, float], min_spots: int,
             rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Random circular windows: ``(section, spot row indices)``, ``n_per_patient`` per source patient
    spread evenly over its sections; a window with fewer than ``min_spots`` spots is redrawn."""
    xy = spatial_um(spots)
    sec = spots.obs[SECTION_KEY].astype(str).to_numpy()
    pat = spots.obs[Key.obs.patient].astype(str).to_numpy()
    out = []
    for p in sorted(set(pat)):
        secs = sorted(set(sec[pat == p]))
        for i, s in enumerate(secs):
            idx = np.flatnonzero(sec == s)
            for _ in range(n_per_patient // len(secs) + (i < n_per_patient % len(secs))):
                for _try in range(100):
                    r = rng.uniform(*radius_um)
                    m = idx[np.linalg.norm(xy[idx] - xy[rng.choice(idx)], axis=1) <= r]
                    if len(m) >= min_spots:
                        break
                else:
                    raise StdistillError(f"section {s}: no window of radius <= {radius_um[1]} um holds {min_spots} spots")
                out.append((s, m))
    return out


def _pseudobulk(spots: ad.AnnData, members: list[np.ndarray]) -> sp.csr_matrix:
    X = sp.csr_matrix(spots.X)
    return sp.csr_matrix(np.vstack([np.asarray(X[m].sum(axis=0)).ravel() for m in members]))


def _log_cp10k(bulk: sp.csr_matrix) -> np.ndarray:
    B = bulk.toarray().astype(np.float64)
    return np.log1p(B / np.maximum(B.sum(1, keepdims=True), 1.0) * 1e4)


def _features(spots: ad.AnnData, encoder, precision: str, cache_dir, size_um: float, px: int) -> np.ndarray:
    from ..features.extract import extract

    key = "X_survival_features"
    extract(spots, encoder, precision=precision, cache_dir=cache_dir, size_um=size_um, px=px, key_added=key)
    return np.asarray(spots.obsm.pop(key), dtype=np.float32)


def _cohort(spots: ad.AnnData, feats: np.ndarray, wins: list[tuple[str, np.ndarray]], rna: pd.DataFrame,
            table: pd.DataFrame, meta: dict) -> Cohort:
    ids = list(table.index)
    bags = {p: feats[m] for p, (_, m) in zip(ids, wins)}
    xy = np.asarray(spots.obsm[Key.obsm.spatial], dtype=np.float64)
    return Cohort(table, bags, {p: p for p in ids}, rna=rna, coords={p: xy[m] for p, (_, m) in zip(ids, wins)},
                  instance_ids={p: spots.obs_names.to_numpy()[m].astype(str) for p, (_, m) in zip(ids, wins)},
                  meta={**meta, "spots": spots})


def her2st_survival(root: str | os.PathLike | None = None, *, n_per_patient: int = 120,
                    radius_um: tuple[float, float] = (600.0, 1000.0), min_spots: int = 15,
                    risk_pathways: Mapping[str, float] = RISK_PATHWAYS, beta: float = 1.0, censoring: float = 0.35,
                    base_rate: float = 1 / 36, seed: int = 0, encoder=ENCODER, precision: str = "fp32",
                    cache_dir: str | os.PathLike | bool | None = None, size_um: float = 112.0, px: int = 224,
                    spots: ad.AnnData | None = None) -> Cohort:
    """The **semi-synthetic** HER2ST survival cohort (see the module docstring).

    Parameters
    ----------
    root
        The her2st copy (see :func:`stdistill.datasets.her2st`); ignored when ``spots`` is given.
    n_per_patient
        Windows ("patients") per source patient (A, B, C), spread evenly over its imaged sections.
    radius_um, min_spots
        Window radius drawn uniformly in this range (um); windows need ``min_spots`` spots.
    risk_pathways
        Hallmark set -> weight of its activity in the hidden risk. Activities: ``pp.pathway_scores``
        (``mean_z``) of the windows' pseudo-bulk, standardised within each section.
    beta, base_rate, censoring
        log-hazard = ``beta`` x the hidden activity (standardised); exponential times with rate
        ``base_rate`` x exp(log-hazard) (months^-1 by convention); share of censored patients.
    encoder, precision, cache_dir, size_um, px
        Patch features (:func:`stdistill.features.extract`, cached on disk).
    spots
        The imaged HER2ST spots, already read (``her2st(images_only=True)``), to skip reading.

    Returns
    -------
    :class:`~stdistill.io._cohort.Cohort`: one slide per window (slide id = patient id
    ``"<section>_w<k>"``); ``table``: ``time``, ``event``, ``hazard_true`` (true log-hazard),
    ``activity`` (hidden activity, sd 1), one column per risk pathway, ``source_patient``,
    ``section``, ``n_spots``; ``rna``: log1p(CP10k) of the pseudo-bulk, centred within each section
    (per-section batch correction); ``coords`` (px) and ``instance_ids`` (spot ids) per window;
    ``meta["spots"]``: the spot AnnData (images for plots).
    """
    from ..pp._pathways import pathway_scores
    from .her2st import her2st

    rng = np.random.default_rng(seed)
    if spots is None:
        spots = her2st(root=root, images_only=True)
    feats = _features(spots, encoder, precision, cache_dir, size_um, px)
    wins = _windows(spots, n_per_patient, radius_um, min_spots, rng)
    bulk = _pseudobulk(spots, [m for _, m in wins])
    ids = [f"{s}_w{k:03d}" for k, (s, _) in enumerate(wins)]
    sec = np.array([s for s, _ in wins])
    pb = ad.AnnData(bulk, obs=pd.DataFrame({SECTION_KEY: sec}, index=ids), var=pd.DataFrame(index=spots.var_names))
    pathway_scores(pb, _risk_net(risk_pathways), method="mean_z", standardize="section", min_genes=5)
    act = pb.obsm[Key.obsm.pathway_scores]
    hidden = _zscore(sum(w * act[p].to_numpy() for p, w in risk_pathways.items()))
    t, e = draw_times(beta * hidden, censoring, base_rate, rng)
    L = pd.DataFrame(_log_cp10k(bulk), index=ids, columns=spots.var_names.astype(str))
    L = L.loc[:, (bulk.getnnz(axis=0) > 0)]
    L = L - L.groupby(sec).transform("mean")
    table = pd.DataFrame({"time": t, "event": e, "hazard_true": beta * hidden, "activity": hidden,
                          **{p: act[p].to_numpy() for p in risk_pathways}, "source_patient": [s[0] for s in sec],
                          "section": sec, "n_spots": [len(m) for _, m in wins]}, index=pd.Index(ids, name="patient"))
    meta = {"dataset": "her2st_survival", "semi_synthetic": True, "encoder": str(encoder), "precision": precision,
            "params": {"n_per_patient": n_per_patient, "radius_um": list(radius_um), "risk_pathways": dict(risk_pathways),
                       "beta": beta, "censoring": censoring, "base_rate": base_rate, "seed": seed}}
    return _cohort(spots, feats, wins, L, table, meta)


def _risk_net(risk_pathways: Mapping[str, float]) -> pd.DataFrame:
    from ..pp._pathways import genesets

    net = genesets("hallmark")
    missing = [p for p in risk_pathways if p not in set(net["source"])]
    if missing:
        raise StdistillError(f"unknown Hallmark sets {missing}")
    return net[net["source"].isin(list(risk_pathways))]


def simulated_survival(n_patients: int = 100, *, spots_per_section: int = 30, beta: float = 1.5,
                       censoring: float = 0.35, base_rate: float = 1 / 36, seed: int = 0, encoder=ENCODER,
                       precision: str = "fp32", cache_dir: str | os.PathLike | bool | None = None,
                       size_um: float = 112.0, px: int = 224) -> Cohort:
    """The **fully simulated** survival cohort (the positive control; see the module docstring).

    One :func:`~stdistill.datasets.simulated` section per patient (``n_patients`` sections of about
    ``spots_per_section`` spots, each its own patient: own gene scaling and stain). Hidden risk:
    z(mean tumour_B share) - z(mean lymphocyte share) over the section's spots, standardised;
    log-hazard = ``beta`` x risk; times as in :func:`her2st_survival`.

    Returns a :class:`~stdistill.io._cohort.Cohort` (patients ``simP<i>``; ``rna`` = log1p(CP10k) of
    the pseudo-bulk; ``table`` with ``hazard_true``, ``activity``, ``tumour_B``, ``lymphocyte``) whose
    ``meta["genesets"]`` holds the planted marker programmes as a source/target/weight table: pass
    it as ``genesets=`` (the simulated genes are not Hallmark symbols).
    """
    from .simulated import simulated

    if n_patients < 4:
        raise StdistillError(f"simulated_survival needs >= 4 patients, got {n_patients}")
    spots = simulated(n_sections=n_patients, n_patients=n_patients, seed=seed, spots_per_section=spots_per_section)
    feats = _features(spots, encoder, precision, cache_dir, size_um, px)
    sec = spots.obs[SECTION_KEY].astype(str).to_numpy()
    wins = [(s, np.flatnonzero(sec == s)) for s in sections(spots)]
    props = spots.obsm[Key.obsm.celltype_props]
    tb = np.array([props["tumour_B"].to_numpy()[m].mean() for _, m in wins])
    ly = np.array([(props["T_cell"] + props["B_cell"]).to_numpy()[m].mean() for _, m in wins])
    hidden = _zscore(_zscore(tb) - _zscore(ly))
    t, e = draw_times(beta * hidden, censoring, base_rate, np.random.default_rng([seed, 7]))
    ids = [str(spots.obs[Key.obs.patient].astype(str).to_numpy()[m][0]) for _, m in wins]
    bulk = _pseudobulk(spots, [m for _, m in wins])
    rna = pd.DataFrame(_log_cp10k(bulk), index=ids, columns=spots.var_names.astype(str))
    marker = spots.var["marker_of"].astype(str)
    net = pd.DataFrame({"source": marker.to_numpy(), "target": spots.var_names.astype(str), "weight": 1.0})
    table = pd.DataFrame({"time": t, "event": e, "hazard_true": beta * hidden, "activity": hidden, "tumour_B": tb,
                          "lymphocyte": ly, "section": [s for s, _ in wins]}, index=pd.Index(ids, name="patient"))
    meta = {"dataset": "simulated_survival", "simulated": True, "encoder": str(encoder), "precision": precision,
            "genesets": net[net["source"] != ""].reset_index(drop=True),
            "params": {"n_patients": n_patients, "spots_per_section": spots_per_section, "beta": beta,
                       "censoring": censoring, "base_rate": base_rate, "seed": seed}}
    return _cohort(spots, feats, wins, rna, table, meta)
