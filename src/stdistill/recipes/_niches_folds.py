"""One held-out patient of :func:`stdistill.recipes.niches.run`: the student fitted on the other
patients, its (and the baselines') scores against the teacher, macro-F1 against pathologist
labels, niche maps; and :func:`score_fold`, the per-fold scores benchmarks share."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from ..io._section import PATIENT_KEY, SECTION_KEY, has_image, subset_sections
from ..metrics import apply_map, ari, macro_f1, majority_map, niche_id_accuracy, nmi, seen_niche_share, trivial_macro_f1
from ._niches_transfer import fit_transfer

TEACHER_KEY = Key.obs.niche_teacher
STUDENT_KEY = Key.obs.niche_student


def score_fold(teacher: np.ndarray, pred: np.ndarray, train: np.ndarray, test: np.ndarray, *,
               clusters: bool = False) -> dict:
    """ARI, NMI and niche-ID accuracy of ``pred`` against ``teacher`` on the ``test`` rows of one fold.

    ``teacher``, ``pred``: (n_obs,) niche ids (compared as strings); ``train``, ``test``: (n_obs,)
    bool rows of the fold's training and held-out patients. ``clusters``: ``pred`` are cluster ids
    (an unsupervised baseline), each mapped to the teacher niche most frequent among its
    *training* spots before the ID accuracy (ARI and NMI ignore identities); the map is returned
    under ``"map"`` (None for niche ids). Returns ``{"ari", "nmi", "id_acc", "map"}``.
    """
    t_te, raw = np.asarray(teacher)[test], np.asarray(pred).astype(str)[test]
    cmap = majority_map(np.asarray(pred)[train], np.asarray(teacher)[train]) if clusters else None
    mapped = raw if cmap is None else apply_map(raw, cmap, default="-1").astype(str)
    return {"ari": ari(t_te, raw), "nmi": nmi(t_te, raw), "id_acc": niche_id_accuracy(t_te, mapped), "map": cmap}


@dataclass
class _Study:
    """What every fold of :func:`run` shares: the data, its masks, the teacher's niches, the
    student's settings, the baselines' codes and the options."""

    adata: ad.AnnData
    feature_key: str
    n_niches: int
    seed: int
    has_f: np.ndarray  # (n_obs,) spots with features
    teach: np.ndarray  # (n_obs,) the teacher's niche ids (str)
    skw: dict  # NicheStudent keywords
    opts: dict  # candidates, transfer, transfer_kwargs, refine, figures, out_dir, verbose
    base_codes: dict = field(default_factory=dict)
    labels: np.ndarray | None = None

    def __post_init__(self):
        self.sec = self.adata.obs[SECTION_KEY].astype(str).to_numpy()
        self.pat = self.adata.obs[PATIENT_KEY].astype(str).to_numpy()
        self.cats = [str(i) for i in range(self.n_niches)]


def _sizes_str(counts: pd.Series) -> str:
    return "/".join(str(int(v)) for v in counts.to_numpy())


def _fold_rows(st: _Study, fold, tr_mask: np.ndarray, te_mask: np.ndarray, s_codes: dict[str, np.ndarray], note: str,
               t_fold: float) -> tuple[list[dict], dict, dict, dict]:
    """Metric rows of one fold (the student and its variants in ``s_codes``, e.g. refined; the
    baselines; the teacher) and what macro-F1 needs: the fold's common row, the predictions and the
    cluster -> teacher-niche maps of the baselines (None for student variants)."""
    teach = st.teach
    t_te = teach[te_mask]
    sizes = pd.Series(t_te).value_counts().reindex(st.cats, fill_value=0)
    preds = {name: codes.astype(str) for name, codes in {**s_codes, **st.base_codes}.items()}
    base_row = dict(fold=fold.name, test_patient="+".join(fold.patients_of("test")), n_test=int(te_mask.sum()),
                    teacher_sizes=_sizes_str(sizes), single_niche=bool(sizes.max() >= 0.95 * max(sizes.sum(), 1)),
                    seen_share=seen_niche_share(t_te, teach[tr_mask]))
    rows, maps = [], {}
    for method, pr in preds.items():
        sc = score_fold(teach, pr, tr_mask, te_mask, clusters=method not in s_codes)
        maps[method] = sc.pop("map")
        rows.append(dict(base_row, method=method, **sc, macro_f1=np.nan, f1_section="",
                         seconds=t_fold if method == "student" else np.nan,
                         note=note if method in s_codes else "clusters -> teacher niche: majority on training patients"))
    rows.append(dict(base_row, method="teacher", ari=np.nan, nmi=np.nan, id_acc=np.nan, macro_f1=np.nan,
                     f1_section="", seconds=np.nan, note=""))
    return rows, base_row, preds, maps


def _macro_f1_step(st: _Study, rows: list[dict], fold, preds: dict, maps: dict, base_row: dict) -> None:
    """Macro-F1 on the first labelled featured section of the test patient, filled into the fold's
    rows in place, plus a row for the trivial (most frequent label) line. The niche -> label map is
    learned on the other patients' labelled spots."""
    labels, teach = st.labels, st.teach
    test_p = fold.patients_of("test")
    for s in fold.test:
        ev = (st.sec == s) & st.has_f & (labels != None)  # noqa: E711 - object array
        if ev.sum() == 0:
            continue
        ref = (labels != None) & ~np.isin(st.pat, test_p)  # noqa: E711
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


def _fold_figures(st: _Study, fold, s_codes: np.ndarray, out_dir: str | os.PathLike) -> list[Path]:
    """Teacher / student / baseline maps of every imaged test section of the fold."""
    from ..pl import niches as plot_niches

    figs = []
    for s in (s for s in fold.test if has_image(st.adata, s)):
        view = subset_sections(st.adata, [s])
        view.obs[STUDENT_KEY] = pd.Categorical.from_codes(s_codes[st.sec == s], categories=st.cats)
        p = Path(out_dir) / f"niches_K{st.n_niches}_{s}.png"
        plot_niches(view, [TEACHER_KEY, STUDENT_KEY, Key.obs.niche_kmeans, Key.obs.niche_kmeans_nbr], section=s,
                    titles=["teacher (ST)", "student (H&E)", "k-means (H&E)", "nbr k-means (H&E)"], path=p)
        figs.append(p)
    return figs


def _fit_student(st: _Study, train: ad.AnnData):
    """The fold's student, fitted on its training sections only (with ``transfer``: the transfer
    setting chosen there, :func:`fit_transfer`)."""
    from ..students.niche import NicheStudent

    o, pkey = st.opts, Key.obsm.probs(TEACHER_KEY)
    if o["transfer"] is None:
        return NicheStudent(st.n_niches, feature_key=st.feature_key, seed=st.seed, **st.skw).fit(
            train, probs_key=pkey, candidates=o["candidates"])
    if o["candidates"]:
        raise StdistillError("transfer= and student_candidates= cannot be combined; choose one")
    return fit_transfer(train, st.feature_key, o["transfer"], probs_key=pkey,
                        student_kwargs=dict(st.skw, n_niches=st.n_niches, seed=st.seed), **(o["transfer_kwargs"] or {}))


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


def _student_step(st: _Study, fold) -> tuple[object, np.ndarray, dict, float]:
    """The fold's student (fitted on its training sections), its held-out probabilities, its codes
    (raw and, with ``refine``, refined) and the seconds it took."""
    tf, extract = time.perf_counter(), st.opts["transfer"] is not None  # transfer: features made as chosen
    student = _fit_student(st, subset_sections(st.adata, list(fold.train + fold.val)))
    test = subset_sections(st.adata, list(fold.test))
    probs = student.predict_proba(test, extract=extract)
    t_fold = time.perf_counter() - tf
    in_test = np.isin(st.sec, fold.test)
    s_codes = {"student": _codes(probs, in_test, st.adata.n_obs)}
    if st.opts["refine"]:
        student.predict(test, key_added="student", extract=extract, refine="auto")
        s_codes["student_refined"] = _codes(np.asarray(test.obsm[Key.obsm.probs(Key.obs.refined("student"))]), in_test, st.adata.n_obs)
    return student, probs, s_codes, t_fold


def _fold_step(st: _Study, fold) -> tuple[list[dict], list[Path], np.ndarray, dict | None]:
    """One held-out patient: student, metrics, macro-F1, figures (and the printed line)."""
    o = st.opts
    tr_mask = np.isin(st.sec, fold.train + fold.val) & st.has_f
    te_mask = np.isin(st.sec, fold.test) & st.has_f
    student, probs, s_codes, t_fold = _student_step(st, fold)
    rows, base_row, preds, maps = _fold_rows(st, fold, tr_mask, te_mask, s_codes, _student_note(student, o["candidates"]),
                                             t_fold)
    if st.labels is not None:
        _macro_f1_step(st, rows, fold, preds, maps, base_row)
    figs = _fold_figures(st, fold, s_codes["student"], o["out_dir"]) if o["figures"] and o["out_dir"] is not None else []
    record = student.info_["transfer"] if o["transfer"] is not None else None
    if o["verbose"]:
        r = {q["method"]: q for q in rows}
        print(f"fold {fold.name}: n={int(te_mask.sum())} teacher sizes {base_row['teacher_sizes']}"
              f"{' (ONE NICHE)' if base_row['single_niche'] else ''} | ARI student {r['student']['ari']:.3f} "
              f"kmeans {r['kmeans']['ari']:.3f} nbr {r['kmeans_nbr']['ari']:.3f} ({t_fold:.1f} s)"
              + (f"; transfer chosen {record['chosen']}" if record is not None else ""))
        if o["candidates"] or record is not None:  # the choice on its training patients, as every recipe prints it
            print(f"fold {fold.name}: settings chosen on its training patients\n{student.selection_}")
    return rows, figs, probs, record
