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
from .._errors import StdistillError
from .._utils import atomic_path, progress, seed_everything
from ..io._section import PATIENT_KEY, SECTION_KEY, has_image, sections, subset_sections
from ..metrics import (
    apply_map,
    ari,
    macro_f1,
    majority_map,
    niche_id_accuracy,
    niche_sizes,
    nmi,
    seen_niche_share,
    trivial_macro_f1,
)
from ._niches_transfer import DEFAULT_TRANSFER_GRID, describe, describe_choice, fit_transfer, parse_transfer, transfer_grid  # noqa: F401 - public here

TEACHER_KEY = "niche_teacher"
STUDENT_KEY = "niche_student"
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
    key_added: str = "niche_kmeans",
    inplace: bool = True,
    copy: bool = False,
) -> ad.AnnData | np.ndarray | None:
    """Unsupervised histology baseline: k-means with ``n_niches`` clusters on patch features.

    ``radius_um=None``: baseline (a), the spot's own features. ``radius_um`` > 0: baseline (b),
    features averaged over the spot and its neighbours within ``radius_um`` um (same section),
    then k-means. Features are z-scored as the student's (``feature_norm``) and reduced to
    ``n_pcs`` principal components. Writes ``obs[key_added]`` (categorical cluster ids; NaN for
    spots without features) and returns None (``copy=True``: a new AnnData; ``inplace=False``: the
    (n_obs,) cluster ids, -1 = no features, nothing written).

    .. versionchanged:: returns None when it writes (it returned the ids too).
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from ..pp.neighbors import aggregate, radius_graph
    from ..students.niche import normalise_features

    if feature_key not in adata.obsm:
        raise StdistillError(f'AnnData has no obsm["{feature_key}"] (patch features)')
    f, ok = normalise_features(adata, np.asarray(adata.obsm[feature_key], dtype=np.float32), feature_norm)
    if ok.sum() < n_niches:
        raise StdistillError(f"{int(ok.sum())} spots with features cannot hold {n_niches} clusters")
    f[~ok] = np.nan
    if radius_um:
        f = aggregate(radius_graph(adata, radius_um), f, n_rings=1, mode="mean")
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


def _sizes_str(counts: pd.Series) -> str:
    return "/".join(str(int(v)) for v in counts.to_numpy())


def _feature_mask(adata: ad.AnnData, feature_key: str) -> np.ndarray:
    if feature_key not in adata.obsm:
        raise StdistillError(
            f'AnnData has no obsm["{feature_key}"] (patch features); run stdistill.features.extract first'
        )
    f = np.asarray(adata.obsm[feature_key], dtype=np.float32)
    return np.all(np.isfinite(f), axis=1)


# ----------------------------------------------------------------------------- recipe
def _teacher_step(adata: ad.AnnData, n_niches: int, seed: int, teacher, reuse_teacher: bool) -> float:
    """Write the teacher's niches (``obs``/``obsm`` under ``TEACHER_KEY``); returns its seconds."""
    from .._niches import write_niches
    from ..teachers.niche import NicheTeacher

    t0 = time.perf_counter()
    pkey = f"{TEACHER_KEY}_probs"
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


def _student_settings(adata: ad.AnnData, has_f: np.ndarray, student_kwargs: dict | None, radius_um: float | None,
                      feature_norm: str) -> tuple[dict, float]:
    """The student's keyword arguments and the neighbourhood radius (um) of baseline (b)."""
    from ..students.niche import NicheStudent

    skw = dict(student_kwargs or {})
    if radius_um is not None:
        skw["radius_um"] = radius_um
    skw.setdefault("feature_norm", feature_norm)
    r_nbr = skw.get("radius_um")
    if r_nbr is None:  # the student's automatic radius, on the spots with features
        from ..pp.neighbors import radius_for_neighbors

        r_nbr = radius_for_neighbors(adata, skw.get("n_neighbors", NicheStudent().params["n_neighbors"]), mask=has_f)
    return skw, r_nbr


def _baselines_step(adata: ad.AnnData, feat_secs: list[str], sec: np.ndarray, feature_key: str, n_niches: int,
                    r_nbr: float, feature_norm: str, seed: int, cats: list[str]) -> dict[str, np.ndarray]:
    """k-means and neighbourhood k-means on all featured spots (unsupervised): ``obs["niche_<name>"]``;
    returns ``{name: (n_obs,) codes, -1 without features}``."""
    fsub = subset_sections(adata, feat_secs)
    base_codes = {}
    for name, rad in (("kmeans", None), ("kmeans_nbr", r_nbr)):
        codes = kmeans_niches(fsub, feature_key, n_niches, radius_um=rad, feature_norm=feature_norm, seed=seed,
                              inplace=False)
        full = np.full(adata.n_obs, -1)
        full[np.isin(sec, feat_secs)] = codes
        base_codes[name] = full
        adata.obs[f"niche_{name}"] = pd.Categorical.from_codes(full, categories=cats)
    return base_codes


def _fold_rows(fold, teach: np.ndarray, tr_mask: np.ndarray, te_mask: np.ndarray, s_codes: dict[str, np.ndarray],
               base_codes: dict, cats: list[str], note: str, t_fold: float) -> tuple[list[dict], dict, dict, dict]:
    """Metric rows of one fold (the student and its variants in ``s_codes``, e.g. refined; the
    baselines; the teacher) and what macro-F1 needs: the fold's common row, the predictions and the
    cluster -> teacher-niche maps of the baselines (None for student variants)."""
    t_te = teach[te_mask]
    sizes = pd.Series(t_te).value_counts().reindex(cats, fill_value=0)
    single = bool(sizes.max() >= 0.95 * max(sizes.sum(), 1))
    preds = {name: codes.astype(str) for name, codes in s_codes.items()}
    maps = dict.fromkeys(s_codes)
    for name, codes in base_codes.items():
        maps[name] = majority_map(codes[tr_mask], teach[tr_mask])
        preds[name] = codes.astype(str)
    base_row = dict(fold=fold.name, test_patient="+".join(fold.patients_of("test")), n_test=int(te_mask.sum()),
                    teacher_sizes=_sizes_str(sizes), single_niche=single, seen_share=seen_niche_share(t_te, teach[tr_mask]))
    rows = []
    for method, pr in preds.items():
        raw = pr[te_mask]
        mapped = raw if maps[method] is None else apply_map(raw, maps[method], default="-1").astype(str)
        rows.append(dict(base_row, method=method, ari=ari(t_te, raw), nmi=nmi(t_te, raw),
                         id_acc=niche_id_accuracy(t_te, mapped), macro_f1=np.nan, f1_section="",
                         seconds=t_fold if method == "student" else np.nan,
                         note=note if method in s_codes else "clusters -> teacher niche: majority on training patients"))
    rows.append(dict(base_row, method="teacher", ari=np.nan, nmi=np.nan, id_acc=np.nan, macro_f1=np.nan,
                     f1_section="", seconds=np.nan, note=""))
    return rows, base_row, preds, maps


def _macro_f1_step(rows: list[dict], fold, labels: np.ndarray, sec: np.ndarray, pat: np.ndarray, has_f: np.ndarray,
                   teach: np.ndarray, preds: dict, maps: dict, base_row: dict) -> None:
    """Macro-F1 on the first labelled featured section of the test patient, filled into the fold's
    rows in place, plus a row for the trivial (most frequent label) line. The niche -> label map is
    learned on the other patients' labelled spots."""
    test_p = fold.patients_of("test")
    for s in fold.test:
        ev = (sec == s) & has_f & (labels != None)  # noqa: E711 - object array
        if ev.sum() == 0:
            continue
        ref = (labels != None) & ~np.isin(pat, test_p)  # noqa: E711
        if ref.sum() == 0:
            continue
        n2l = majority_map(teach[ref], labels[ref])
        y = labels[ev].astype(str)
        default, _ = trivial_macro_f1(labels[ref].astype(str))
        lab_classes = sorted(set(y))
        cand = {"teacher": teach[ev]}
        for name, m in maps.items():  # student variants are niche ids already; baselines go through their map
            cand[name] = preds[name][ev] if m is None else apply_map(preds[name][ev], m, default="-1").astype(str)
        for r in rows:
            if r["fold"] == fold.name and r["method"] in cand:
                r["macro_f1"] = macro_f1(y, apply_map(cand[r["method"]], n2l, default=default).astype(str),
                                         labels=lab_classes)
                r["f1_section"] = s
        rows.append(dict(base_row, method=f"trivial (all '{default}')", ari=np.nan, nmi=np.nan, id_acc=np.nan,
                         macro_f1=macro_f1(y, np.full(len(y), default), labels=lab_classes), f1_section=s,
                         seconds=np.nan, note="majority label of the map's training labels"))
        return  # one labelled section per fold


def _fold_figures(adata: ad.AnnData, fold, sec: np.ndarray, s_codes: np.ndarray, cats: list[str], n_niches: int,
                  out_dir: str | os.PathLike) -> list[Path]:
    """Teacher / student / baseline maps of every imaged test section of the fold."""
    from ..pl import niches as plot_niches

    figs = []
    for s in (s for s in fold.test if has_image(adata, s)):
        view = subset_sections(adata, [s])
        view.obs[STUDENT_KEY] = pd.Categorical.from_codes(s_codes[sec == s], categories=cats)
        p = Path(out_dir) / f"niches_K{n_niches}_{s}.png"
        plot_niches(view, [TEACHER_KEY, STUDENT_KEY, "niche_kmeans", "niche_kmeans_nbr"], section=s,
                    titles=["teacher (ST)", "student (H&E)", "k-means (H&E)", "nbr k-means (H&E)"], path=p)
        figs.append(p)
    return figs


def _fit_student(train: ad.AnnData, feature_key: str, n_niches: int, seed: int, skw: dict, probs_key: str,
                 candidates: list[dict] | None, transfer, transfer_kwargs: dict | None):
    """The fold's student, fitted on its training sections only (with ``transfer``: the transfer
    setting chosen there, :func:`fit_transfer`)."""
    from ..students.niche import NicheStudent

    if transfer is None:
        return NicheStudent(n_niches, feature_key=feature_key, seed=seed, **skw).fit(train, probs_key=probs_key,
                                                                                     candidates=candidates)
    if candidates:
        raise StdistillError("transfer= and student_candidates= cannot be combined; choose one")
    return fit_transfer(train, feature_key, transfer, probs_key=probs_key,
                        student_kwargs=dict(skw, n_niches=n_niches, seed=seed), **(transfer_kwargs or {}))


def _student_note(student, candidates) -> str:
    """The fold's note: validation patient, epochs, and what was chosen there."""
    info = student.info_
    note = f"val patient {','.join(info.get('val_patients', [])) or '-'}, {info.get('best_epoch')} epochs"
    if candidates:
        note += f", chose {info.get('chosen') or {}}"
    if info.get("transfer"):
        note += f", transfer {info['transfer']['chosen']}"
    return note


def _codes(probs: np.ndarray, rows: np.ndarray, n_obs: int) -> np.ndarray:
    """(n_obs,) argmax niche of ``probs`` placed at the boolean ``rows``; -1 elsewhere and where NaN."""
    out = np.full(n_obs, -1)
    out[rows] = np.where(np.all(np.isfinite(probs), 1), np.nan_to_num(probs).argmax(1), -1)
    return out


def _write_metrics(df: pd.DataFrame, sizes_all: pd.DataFrame, out_dir: str | os.PathLike, n_niches: int) -> None:
    out = Path(out_dir)
    with atomic_path(out / f"metrics_K{n_niches}.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / f"teacher_sizes_K{n_niches}.csv") as tmp:
        sizes_all.to_csv(tmp)


_COLUMNS = ["fold", "test_patient", "method", "ari", "nmi", "id_acc", "seen_share", "macro_f1", "f1_section", "n_test",
            "teacher_sizes", "single_niche", "seconds", "note"]


def run(
    adata: ad.AnnData,
    feature_key: str,
    n_niches: int = 6,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    teacher=None,
    reuse_teacher: bool = False,
    student_kwargs: dict | None = None,
    student_candidates: list[dict] | None = None,
    radius_um: float | None = None,
    feature_norm: str = "section",
    label_key: str | None = "pathology",
    figures: bool = True,
    verbose: bool = True,
    refine: bool = False,
    transfer: str | list[dict] | None = None,
    transfer_kwargs: dict | None = None,
) -> tuple[pd.DataFrame, list[Path]]:
    """Leave-one-patient-out niche distillation on any dataset in the stdistill layout.

    Parameters
    ----------
    adata
        All sections (obs section/patient, obsm spatial, raw counts in ``X``); patch features in
        ``obsm[feature_key]`` for spots with an image (NaN rows or missing sections elsewhere).
        Modified in place: ``obs["niche_teacher"]`` (+``obsm["niche_teacher_probs"]``),
        ``obs["niche_student"]`` (+probs; held-out predictions, one per spot with features),
        ``obs["niche_kmeans"]``, ``obs["niche_kmeans_nbr"]``.
    feature_key
        ``obsm`` key of patch features, e.g. ``"X_effnet-lite0-imagenet"``.
    n_niches
        K for teacher, student and baselines.
    out_dir
        Where ``metrics.csv``, ``teacher_sizes.csv`` and the niche-map PNGs go (None: nothing written).
    teacher
        ``None``: fit ``NicheTeacher(n_niches, seed=seed)``; a :class:`NicheTeacher` (fitted or not)
        to use instead; ``reuse_teacher=True`` uses ``obsm["niche_teacher_probs"]`` already present.
    student_kwargs
        Passed to :class:`~stdistill.students.NicheStudent` (``feature_key``, ``seed`` set here).
    student_candidates
        Settings to choose from in each fold (e.g. ``[{"radius_um": 250}, {"radius_um": 650}]``),
        scored on the validation patient inside the training patients (never the test fold);
        see :meth:`NicheStudent.fit`. Baseline (b) always uses the default ``radius_um``.
    radius_um
        Neighbourhood (um) of the student and of baseline (b); ``None``: the student's automatic
        radius (about 18 neighbours), computed on the spots with features.
    label_key
        ``obs`` column of pathologist labels for macro-F1 (``"undetermined"`` spots ignored).
    refine
        Also score the student refined on each held-out section with the refinement it chose on its
        validation patient (``NicheStudent.predict(refine="auto")``; label-free, H&E only), as
        method ``"student_refined"``; the raw student stays.
    transfer
        Choose the student's transfer setting (stain normalisation, augmented views, context
        token) in each fold on its validation patient, among the training patients
        (:func:`fit_transfer`; ``"auto"``: every combination, or a list of settings dicts). The
        candidates' features are extracted on the training sections (feature cache); the
        held-out patient's are extracted at prediction as the chosen ones were made (stain
        normalisation onto the training reference). Needs images and ``obsm[feature_key]`` from
        :func:`stdistill.features.extract`. None: the plain student.
    transfer_kwargs
        Passed to :func:`fit_transfer` (``n_views``, ``view_seed``, ``context_um``, ``cache_dir``).

    Returns
    -------
    ``(metrics, figure_paths)``. ``metrics``: one row per (fold, method) with columns
    ``fold, test_patient, method, ari, nmi, id_acc, seen_share, macro_f1, f1_section, n_test,
    teacher_sizes, single_niche, seconds, note``; ``metrics.attrs`` holds ``teacher_nmi_patient``
    and ``teacher_sizes`` (DataFrame patients x niches); with ``transfer`` also ``transfer``
    (per fold: the ``info_["transfer"]`` of its student).
    """
    from .._niches import write_niches
    from ..pp.splits import folds as make_folds

    t_start = time.perf_counter()
    seed_everything(seed)
    for k in (SECTION_KEY, PATIENT_KEY):
        if k not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{k}"]')
    has_f = _feature_mask(adata, feature_key)
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    pat = adata.obs[PATIENT_KEY].astype(str).to_numpy()

    t_teacher = _teacher_step(adata, n_niches, seed, teacher, reuse_teacher)
    pkey = f"{TEACHER_KEY}_probs"
    teach = adata.obs[TEACHER_KEY].astype(str).to_numpy()
    cats = [str(i) for i in range(n_niches)]
    sizes_all = niche_sizes(teach, pat, categories=cats)
    teacher_nmi = nmi(pat, teach)
    if verbose:
        print(f"teacher: K={n_niches}, NMI(niche, patient) = {teacher_nmi:.3f} ({t_teacher:.1f} s)")

    feat_secs = [s for s in sections(adata) if has_f[sec == s].any()]
    sp_map = {s: pat[sec == s][0] for s in feat_secs}
    if len(set(sp_map.values())) < 2:
        raise StdistillError("leave-one-patient-out needs patch features for at least 2 patients")
    folds = make_folds(pd.Series(sp_map))
    skw, r_nbr = _student_settings(adata, has_f, student_kwargs, radius_um, feature_norm)
    base_codes = _baselines_step(adata, feat_secs, sec, feature_key, n_niches, r_nbr, skw["feature_norm"], seed, cats)

    labels = _labels(adata, label_key)
    student_probs = np.full((adata.n_obs, n_niches), np.nan, dtype=np.float32)
    rows: list[dict] = []
    figs: list[Path] = []
    chosen_transfer = {}
    for fold in progress(folds, desc="niches: held-out folds"):
        tf = time.perf_counter()
        tr_mask = np.isin(sec, fold.train + fold.val) & has_f
        te_mask = np.isin(sec, fold.test) & has_f
        student = _fit_student(subset_sections(adata, list(fold.train + fold.val)), feature_key, n_niches, seed, skw,
                               pkey, student_candidates, transfer, transfer_kwargs)
        test = subset_sections(adata, list(fold.test))
        probs = student.predict_proba(test, extract=transfer is not None)  # transfer: features made as chosen
        student_probs[np.isin(sec, fold.test)] = probs
        t_fold = time.perf_counter() - tf
        s_codes = {"student": _codes(probs, np.isin(sec, fold.test), adata.n_obs)}
        if refine:
            student.predict(test, key_added="student", extract=transfer is not None, refine="auto")
            s_codes["student_refined"] = _codes(np.asarray(test.obsm["student_refined_probs"]), np.isin(sec, fold.test),
                                                adata.n_obs)
        if transfer is not None:
            chosen_transfer[fold.name] = student.info_["transfer"]
        note = _student_note(student, student_candidates)
        fold_rows, base_row, preds, maps = _fold_rows(fold, teach, tr_mask, te_mask, s_codes, base_codes, cats, note, t_fold)
        rows += fold_rows
        if labels is not None:
            _macro_f1_step(rows, fold, labels, sec, pat, has_f, teach, preds, maps, base_row)
        if figures and out_dir is not None:
            figs += _fold_figures(adata, fold, sec, s_codes["student"], cats, n_niches, out_dir)
        if verbose:
            r = {q["method"]: q for q in rows if q["fold"] == fold.name}
            print(f"fold {fold.name}: n={int(te_mask.sum())} teacher sizes {base_row['teacher_sizes']}"
                  f"{' (ONE NICHE)' if base_row['single_niche'] else ''} | ARI student {r['student']['ari']:.3f} "
                  f"kmeans {r['kmeans']['ari']:.3f} nbr {r['kmeans_nbr']['ari']:.3f} ({t_fold:.1f} s)"
                  + (f"; transfer chosen {chosen_transfer[fold.name]['chosen']}" if transfer is not None else ""))

    write_niches(adata, student_probs, STUDENT_KEY)
    df = pd.DataFrame(rows)[_COLUMNS]
    df.attrs.update(teacher_nmi_patient=teacher_nmi, teacher_sizes=sizes_all, teacher_seconds=t_teacher,
                    seconds=time.perf_counter() - t_start)
    if transfer is not None:
        df.attrs["transfer"] = chosen_transfer
    if out_dir is not None:
        _write_metrics(df, sizes_all, out_dir, n_niches)
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
