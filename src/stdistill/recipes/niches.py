"""Niche distillation, end to end: transcriptomic teacher -> H&E student -> unsupervised histology
baselines -> metrics -> niche maps, leave-one-patient-out over the patients with image features.

Protocol (what :func:`run` does)
--------------------------------
1. **Teacher** (:class:`~stdistill.teachers.NicheTeacher`): fitted once on *all* sections of
   ``adata``, including those without an image (expression only; it is the reference, frozen).
   Diagnostics: NMI(niche, patient) and niche sizes per patient.
2. **Folds**: leave-one-patient-out over the patients whose spots have features
   (:func:`stdistill.pp.folds`). For each fold the student is fitted on the training patients
   (early stopping on one of them, see :class:`~stdistill.students.NicheStudent`) and predicts
   the held-out patient from H&E features alone.
3. **Baselines** (histology only, unsupervised, same features and feature normalisation):
   (a) ``kmeans``: k-means (K clusters) on the patch features; (b) ``kmeans_nbr``: the features
   averaged over the student's neighbourhood (same ``radius_um``, spot included), then k-means.
   k-means is fitted on every featured spot (training and held-out patients: no labels are
   used, and it favours the baselines). For identity accuracy and macro-F1 each cluster is
   mapped to the teacher niche most frequent among its *training-patient* spots.
4. **Metrics** per fold on the held-out patient: ARI, NMI and niche-ID accuracy against the
   teacher; share of test spots whose teacher niche occurs in the training patients; teacher
   niche sizes in the test patient (flag: >= 95% in one niche makes ARI ~0 or 1 by
   construction). **Macro-F1** on every labelled (``obs[label_key]``) featured section of the held-out
   patient: niche -> label map learned from the teacher's niches on the labelled spots of the
   other patients' sections (images not needed); applied to teacher, student and (mapped)
   baseline niches; the trivial line predicts the most frequent training label everywhere.
5. **Figures**: for each fold, the first held-out section with an image: teacher | student |
   k-means | neighbourhood k-means, colours Hungarian-matched to the teacher.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._api import deliver
from .._defaults import N_NEIGHBORS
from .._errors import StdistillError
from .._keys import Key
from .._niches import write_niches
from .._utils import atomic_path, progress, seed_everything
from ..io._section import PATIENT_KEY, SECTION_KEY, sections, subset_sections
from ..metrics import niche_sizes, nmi
from ._niches_folds import STUDENT_KEY, TEACHER_KEY, _fold_step, _Study, score_fold  # noqa: F401 - score_fold public here
from ._niches_transfer import DEFAULT_TRANSFER_GRID, describe, describe_choice, fit_transfer, parse_transfer, transfer_grid  # noqa: F401 - public here

BASELINES = {"kmeans": "k-means on patch features", "kmeans_nbr": "k-means on neighbourhood-averaged features"}
IGNORE_LABELS = ("undetermined", "", "nan", "None")


# ----------------------------------------------------------------------------- baselines
def kmeans_niches(
    adata: ad.AnnData,
    feature_key: str,
    n_niches: int,
    *,
    radius_um: float | None = None,
    feature_norm: str = "section",
    n_pcs: int | None = 50,
    seed: int = 0,
    key_added: str = Key.obs.niche_kmeans,
    connectivity_key: str = Key.obsp.spatial_connectivities,
    inplace: bool = True,
    copy: bool = False,
) -> ad.AnnData | np.ndarray | None:
    """Unsupervised histology baseline: k-means with ``n_niches`` clusters on patch features.

    ``radius_um=None``: baseline (a), the spot's own features. ``radius_um`` > 0: baseline (b),
    features averaged over the spot and its neighbours within ``radius_um`` um (same section),
    then k-means (the spot graph of ``radius_um`` under ``connectivity_key``, built when absent:
    :func:`stdistill.pp.spot_graph`). Features are z-scored as the student's (``feature_norm``) and
    reduced to ``n_pcs`` principal components. Writes ``obs[key_added]`` (categorical cluster ids; NaN for
    spots without features) and returns None (``copy=True``: a new AnnData; ``inplace=False``: the
    (n_obs,) cluster ids, -1 = no features, nothing written).

    .. versionchanged:: returns None when it writes (it returned the ids too).
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from ..pp.neighbors import aggregate, spot_graph
    from ..students.niche import normalise_features

    if feature_key not in adata.obsm:
        raise StdistillError(f'AnnData has no obsm["{feature_key}"] (patch features)')
    f, ok = normalise_features(adata, np.asarray(adata.obsm[feature_key], dtype=np.float32), feature_norm)
    if ok.sum() < n_niches:
        raise StdistillError(f"{int(ok.sum())} spots with features cannot hold {n_niches} clusters")
    f[~ok] = np.nan
    if radius_um:
        f = aggregate(spot_graph(adata, radius_um, connectivity_key=connectivity_key), f, n_rings=1, mode="mean")
    x = f[ok]
    if n_pcs and x.shape[1] > n_pcs:
        x = PCA(n_components=min(n_pcs, x.shape[0] - 1), random_state=seed).fit_transform(x)
    lab = KMeans(n_niches, n_init=10, random_state=seed).fit_predict(x)
    out = np.full(adata.n_obs, -1)
    out[ok] = lab

    def write(target: ad.AnnData) -> None:
        target.obs[key_added] = pd.Categorical.from_codes(out, categories=[str(i) for i in range(n_niches)])

    return deliver(adata, out, write, copy=copy, inplace=inplace)


# ----------------------------------------------------------------------------- helpers
def _labels(adata: ad.AnnData, label_key: str | None) -> np.ndarray | None:
    if not label_key or label_key not in adata.obs:
        return None
    lab = adata.obs[label_key].astype(str).to_numpy().astype(object)
    lab[np.isin(lab, IGNORE_LABELS)] = None
    return lab


def _check_inputs(adata: ad.AnnData, feature_key: str) -> np.ndarray:
    """The (n_obs,) mask of spots with features; one clear error for missing keys."""
    for k in (SECTION_KEY, PATIENT_KEY):
        if k not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{k}"]')
    if feature_key not in adata.obsm:
        raise StdistillError(
            f'AnnData has no obsm["{feature_key}"] (patch features); run stdistill.features.extract first'
        )
    f = np.asarray(adata.obsm[feature_key], dtype=np.float32)
    return np.all(np.isfinite(f), axis=1)


# ----------------------------------------------------------------------------- recipe
def _teacher_step(adata: ad.AnnData, n_niches: int, seed: int, teacher, reuse_teacher: bool) -> float:
    """Write the teacher's niches (``obs``/``obsm`` under ``TEACHER_KEY``); returns its seconds."""
    from ..teachers.niche import NicheTeacher

    t0 = time.perf_counter()
    pkey = Key.obsm.probs(TEACHER_KEY)
    if reuse_teacher:
        if pkey not in adata.obsm or np.asarray(adata.obsm[pkey]).shape[1] != n_niches:
            raise StdistillError(f'reuse_teacher=True needs obsm["{pkey}"] with {n_niches} columns')
        write_niches(adata, np.asarray(adata.obsm[pkey]), TEACHER_KEY)
    else:
        tobj = teacher if teacher is not None else NicheTeacher(n_niches, seed=seed)
        if tobj.n_niches != n_niches:
            raise StdistillError(f"teacher has {tobj.n_niches} niches, run() was asked for {n_niches}")
        if tobj.state_ is None:
            tobj.fit_predict(adata, key_added=TEACHER_KEY)
        else:
            tobj.predict(adata, key_added=TEACHER_KEY)
    return time.perf_counter() - t0


def _teacher_diagnostics(adata: ad.AnnData, n_niches: int, seconds: float, verbose: bool) -> dict:
    """The teacher's niche sizes per patient and NMI(niche, patient) (printed with ``verbose``)."""
    teach = adata.obs[TEACHER_KEY].astype(str).to_numpy()
    pat = adata.obs[PATIENT_KEY].astype(str).to_numpy()
    out = dict(teacher_nmi_patient=nmi(pat, teach), teacher_sizes=niche_sizes(teach, pat, categories=[str(i) for i in range(n_niches)]),
               teacher_seconds=seconds)
    if verbose:
        print(f"teacher: K={n_niches}, NMI(niche, patient) = {out['teacher_nmi_patient']:.3f} ({seconds:.1f} s)")
    return out


def _folds_step(adata: ad.AnnData, has_f: np.ndarray) -> tuple[list[str], list]:
    """The sections with features and leave-one-patient-out folds over their patients."""
    from ..pp.splits import folds as make_folds

    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    pat = adata.obs[PATIENT_KEY].astype(str).to_numpy()
    feat_secs = [s for s in sections(adata) if has_f[sec == s].any()]
    sp_map = {s: pat[sec == s][0] for s in feat_secs}
    if len(set(sp_map.values())) < 2:
        raise StdistillError("leave-one-patient-out needs patch features for at least 2 patients")
    return feat_secs, make_folds(pd.Series(sp_map))


def _student_settings(adata: ad.AnnData, has_f: np.ndarray, student_kwargs: dict | None, radius_um: float | None,
                      feature_norm: str, connectivity_key: str) -> tuple[dict, float]:
    """The student's keyword arguments and the neighbourhood radius (um) of baseline (b)."""
    skw = dict(student_kwargs or {})
    if radius_um is not None:
        skw["radius_um"] = radius_um
    skw.setdefault("feature_norm", feature_norm)
    skw.setdefault("connectivity_key", connectivity_key)
    r_nbr = skw.get("radius_um")
    if r_nbr is None:  # the student's automatic radius, on the spots with features
        from ..pp.neighbors import radius_for_neighbors

        r_nbr = radius_for_neighbors(adata, skw.get("n_neighbors", N_NEIGHBORS), mask=has_f)
    return skw, r_nbr


def _baselines_step(st: _Study, feat_secs: list[str], r_nbr: float) -> dict[str, np.ndarray]:
    """k-means and neighbourhood k-means on all featured spots (unsupervised): ``obs["niche_<name>"]``;
    returns ``{name: (n_obs,) codes, -1 without features}``."""
    from ..pp.neighbors import spot_graph

    if r_nbr:  # the neighbourhood's spot graph, built once on every spot: the subsets here and in the folds inherit it
        spot_graph(st.adata, r_nbr, connectivity_key=st.skw["connectivity_key"])
    fsub = subset_sections(st.adata, feat_secs)
    base_codes = {}
    for name, rad, key in (("kmeans", None, Key.obs.niche_kmeans), ("kmeans_nbr", r_nbr, Key.obs.niche_kmeans_nbr)):
        codes = kmeans_niches(fsub, st.feature_key, st.n_niches, radius_um=rad, feature_norm=st.skw["feature_norm"],
                              seed=st.seed, connectivity_key=st.skw["connectivity_key"], inplace=False)
        full = np.full(st.adata.n_obs, -1)
        full[np.isin(st.sec, feat_secs)] = codes
        base_codes[name] = full
        st.adata.obs[key] = pd.Categorical.from_codes(full, categories=st.cats)
    return base_codes


def _folds_loop(st: _Study, folds) -> tuple[list[dict], list[Path], dict]:
    """Every held-out patient in turn (:func:`._niches_folds._fold_step`); writes the held-out
    predictions (``obs``/``obsm`` under ``STUDENT_KEY``). Returns (rows, figures, chosen transfer per fold)."""
    probs = np.full((st.adata.n_obs, st.n_niches), np.nan, dtype=np.float32)
    rows, figs, chosen = [], [], {}
    for fold in progress(folds, desc="niches: held-out folds"):
        fold_rows, fold_figs, probs[np.isin(st.sec, fold.test)], record = _fold_step(st, fold)
        rows, figs = rows + fold_rows, figs + fold_figs
        if record is not None:
            chosen[fold.name] = record
    write_niches(st.adata, probs, STUDENT_KEY)
    return rows, figs, chosen


def _write_metrics(df: pd.DataFrame, sizes_all: pd.DataFrame, out_dir: str | os.PathLike, n_niches: int) -> None:
    out = Path(out_dir)
    with atomic_path(out / f"metrics_K{n_niches}.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / f"teacher_sizes_K{n_niches}.csv") as tmp:
        sizes_all.to_csv(tmp)


_COLUMNS = ["fold", "test_patient", "method", "ari", "nmi", "id_acc", "seen_share", "macro_f1", "f1_section", "n_test",
            "teacher_sizes", "single_niche", "seconds", "note"]


def run(adata: ad.AnnData, feature_key: str, n_niches: int = 6, out_dir: str | os.PathLike | None = None, seed: int = 0,
        *, teacher=None, reuse_teacher: bool = False, student_kwargs: dict | None = None,
        student_candidates: list[dict] | None = None, radius_um: float | None = None, feature_norm: str = "section",
        label_key: str | None = "pathology", figures: bool = True, verbose: bool = True, refine: bool = False,
        transfer: str | list[dict] | None = None, transfer_kwargs: dict | None = None,
        connectivity_key: str = Key.obsp.spatial_connectivities) -> tuple[pd.DataFrame, list[Path]]:
    """Leave-one-patient-out niche distillation on any dataset in the stdistill layout (the protocol:
    the module docstring).

    ``adata``: all sections (obs section/patient, obsm spatial, raw counts in ``X``) with patch
    features ``obsm[feature_key]`` (NaN rows for spots without an image). Written in place:
    ``obs["niche_teacher"]``, ``obs["niche_student"]`` (held-out predictions), each with its
    ``obsm[..._probs]``, ``obs["niche_kmeans"]``, ``obs["niche_kmeans_nbr"]`` and, when absent, the
    spot graph of the neighbourhood radius (``obsp``, :func:`stdistill.pp.spot_graph`). ``n_niches``:
    K of teacher, student and baselines. ``out_dir``: ``metrics_K<K>.csv``, ``teacher_sizes_K<K>.csv``
    and the niche maps (None: nothing written).

    ``teacher``: None fits ``NicheTeacher(n_niches, seed=seed)``, else this :class:`NicheTeacher`
    (fitted or not); ``reuse_teacher``: ``obsm["niche_teacher_probs"]`` as present.
    ``student_kwargs``: :class:`~stdistill.students.NicheStudent` settings (``feature_key``, ``seed``
    set here). ``student_candidates``: settings chosen in each fold on a validation patient among
    its training patients, never the test fold (:meth:`NicheStudent.fit`; baseline (b) keeps the
    default radius). ``radius_um``: neighbourhood (um) of the student and baseline (b); None: the
    student's automatic radius (about 18 neighbours) on the spots with features. ``label_key``:
    pathologist labels for macro-F1 (``"undetermined"`` ignored). ``refine``: also score the student
    refined with the refinement it chose on its validation patient (``"student_refined"``).
    ``transfer``: choose the student's transfer setting (stain normalisation, views, context token)
    in each fold on its validation patient (:func:`fit_transfer`; ``"auto"`` or a list of settings;
    the held-out patient's features are made as the chosen ones), with ``transfer_kwargs``
    (``n_views``, ``view_seed``, ``context_um``, ``cache_dir``). ``connectivity_key``: the ``obsp``
    spot graph (squidpy's name) baselines, students and refinements read at their radius (a graph
    the user supplied: as given).

    Returns ``(metrics, figure_paths)``: one row per (fold, method) with columns ``fold,
    test_patient, method, ari, nmi, id_acc, seen_share, macro_f1, f1_section, n_test,
    teacher_sizes, single_niche, seconds, note``; ``metrics.attrs``: ``teacher_nmi_patient``,
    ``teacher_sizes`` (patients x niches), ``teacher_seconds``, ``seconds`` and, with ``transfer``,
    ``transfer`` (per fold: its student's ``info_["transfer"]``); the niche maps written under
    ``out_dir``.
    """
    t_start = time.perf_counter()
    seed_everything(seed)
    has_f = _check_inputs(adata, feature_key)
    attrs = _teacher_diagnostics(adata, n_niches, _teacher_step(adata, n_niches, seed, teacher, reuse_teacher), verbose)
    feat_secs, folds = _folds_step(adata, has_f)
    skw, r_nbr = _student_settings(adata, has_f, student_kwargs, radius_um, feature_norm, connectivity_key)
    st = _Study(adata, feature_key, n_niches, seed, has_f, adata.obs[TEACHER_KEY].astype(str).to_numpy(), skw,
                dict(candidates=student_candidates, transfer=transfer, transfer_kwargs=transfer_kwargs, refine=refine,
                     figures=figures, out_dir=out_dir, verbose=verbose), labels=_labels(adata, label_key))
    st.base_codes = _baselines_step(st, feat_secs, r_nbr)
    rows, figs, chosen_transfer = _folds_loop(st, folds)
    df = pd.DataFrame(rows)[_COLUMNS]
    df.attrs.update(attrs, seconds=time.perf_counter() - t_start)
    if transfer is not None:
        df.attrs["transfer"] = chosen_transfer
    if out_dir is not None:
        _write_metrics(df, attrs["teacher_sizes"], out_dir, n_niches)
    return df, figs


run_niches = run


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over folds of ARI/NMI/ID-accuracy per method (rows: student, student_refined when
    scored, kmeans, kmeans_nbr)."""
    m = df[df["method"].isin(["student", "student_refined", *BASELINES])]
    return m.groupby("method", sort=False)[["ari", "nmi", "id_acc"]].mean()


def markdown(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A pandas DataFrame as a GitHub markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "" if pd.isna(v) else floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join(lines)


def format_table(df: pd.DataFrame) -> str:
    """Markdown table of a :func:`run` result (per fold and method)."""
    cols = ["fold", "method", "ari", "nmi", "id_acc", "seen_share", "macro_f1", "teacher_sizes", "single_niche"]
    return markdown(df[cols])
