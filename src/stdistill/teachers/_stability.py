"""How far a niche teacher's partition moves when nothing in the data moves.

:func:`teacher_stability` refits a teacher under three perturbations and scores every pair of
refits by ARI, per K:

- ``seed``: the teacher's seed (mixture initialisation, randomized PCA, the consensus members);
- ``solver``: the same seed with a randomized and with an exact PCA (``pca_solver``);
- ``subsample``: fits on different random shares of the spots (as if the others had never been
  measured), ARI on the spots the two fits have in common.

The embedding does not depend on K, so each refit embeds once and fits every K on it, exactly as
``NicheTeacher(K)`` would (a test checks that the labels agree).
"""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from ..metrics import ari, hungarian_match

PERTURBATIONS = ("seed", "solver", "subsample")


def fit_each_k(adata: ad.AnnData, teacher, ks: list[int], **overrides) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """A copy of ``teacher`` (params changed by ``overrides``) fitted on ``adata`` once per K in
    ``ks`` on one embedding: ``{K: (soft labels (n_obs, K), agreement (n_obs,) or None)}``, exactly
    what ``NicheTeacher(K)`` with the same params would fit (``agreement``: consensus teachers)."""
    from ._consensus import fit_mixture
    from .niche import NicheTeacher

    if teacher.params["method"] != "aggregate":
        raise StdistillError("teacher stability is computed for method='aggregate' teachers")
    t = NicheTeacher(**{**teacher.params, "n_niches": list(ks), **overrides})
    f = t._aggregate(adata, t._fit_embedding(adata))
    out = {}
    for k in ks:
        t.fit_agreement_ = None
        _, probs = fit_mixture(t, f, k=k)
        out[k] = (probs, t.fit_agreement_)
    return out


def fit_labels(adata: ad.AnnData, teacher, ks: list[int], **overrides) -> dict[int, pd.Series]:
    """Hard niches of :func:`fit_each_k`: ``{K: Series of niche ids indexed by obs_names}``."""
    return {k: pd.Series(p.argmax(1), index=adata.obs_names) for k, (p, _) in fit_each_k(adata, teacher, ks, **overrides).items()}


def pair_ari(a: pd.Series, b: pd.Series) -> tuple[float, int]:
    """ARI between two partitions on the spots (index) they share, and how many those are."""
    common = a.index.intersection(b.index)
    if len(common) < 2:
        raise StdistillError("two partitions share fewer than 2 spots")
    return ari(a.loc[common].to_numpy(), b.loc[common].to_numpy()), len(common)


def teacher_stability(adata: ad.AnnData, teacher, ks: list[int] | None = None, *, seeds=(0, 1, 2),
                      solvers=("randomized", "exact"), fraction: float = 0.9, n_subsamples: int = 3,
                      subsample_seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Refit ``teacher`` (its params; fitted or not) under each perturbation; returns ``(pairs,
    runs)``. ``pairs``: one row per pair of refits and K: ``k, perturbation, a, b, ari, n_common``.
    ``runs``: ``{run name: {K: Series of niche ids by obs_names}}`` (``seed<s>``: all spots with
    ``solvers[0]``; ``<solvers[1]><s>``; ``subsample<i>``: ``fraction`` of the spots, seed ``seeds[0]``).
    ``ks=None``: the teacher's K (or its range)."""
    from ._consensus import member_rows

    ks = [teacher.params["n_niches"]] if ks is None and isinstance(teacher.params["n_niches"], int) else list(
        ks if ks is not None else teacher.params["n_niches"])
    runs: dict[str, dict] = {}
    for s in seeds:
        runs[f"seed{s}"] = fit_labels(adata, teacher, ks, seed=s, pca_solver=solvers[0])
        runs[f"{solvers[1]}{s}"] = fit_labels(adata, teacher, ks, seed=s, pca_solver=solvers[1])
    for i in range(n_subsamples):
        rows = member_rows(adata.n_obs, 10_000 * (subsample_seed + 1) + i, fraction)
        runs[f"subsample{i}"] = fit_labels(adata[rows].copy(), teacher, ks, seed=seeds[0], pca_solver=solvers[0])
    plan = {"seed": list(itertools.combinations([f"seed{s}" for s in seeds], 2)),
            "solver": [(f"seed{s}", f"{solvers[1]}{s}") for s in seeds],
            "subsample": list(itertools.combinations([f"subsample{i}" for i in range(n_subsamples)], 2))}
    rows_out = []
    for k in ks:
        for kind, pairs in plan.items():
            for a, b in pairs:
                v, n = pair_ari(runs[a][k], runs[b][k])
                rows_out.append(dict(k=k, perturbation=kind, a=a, b=b, ari=v, n_common=n))
    return pd.DataFrame(rows_out), runs


def summarise_stability(pairs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (ddof 0) of the ARI per K and perturbation, and the number of pairs."""
    g = pairs.groupby(["k", "perturbation"], sort=True)["ari"]
    return pd.DataFrame({"ari_mean": g.mean(), "ari_sd": g.std(ddof=0), "n_pairs": g.size()}).reset_index()


def spot_agreement(reference: pd.Series, others: list[pd.Series]) -> pd.Series:
    """Per spot of ``reference``: the share of ``others`` (each matched to the reference's niche ids
    by the Hungarian assignment on their common spots) that give it the reference's niche; spots
    a refit lacks are not counted for it."""
    agree = pd.Series(0.0, index=reference.index)
    seen = pd.Series(0.0, index=reference.index)
    for o in others:
        common = reference.index.intersection(o.index)
        m = hungarian_match(reference.loc[common].to_numpy(), o.loc[common].to_numpy())
        mapped = np.array([m[str(v)] for v in o.loc[common].to_numpy()])
        agree.loc[common] += (mapped == reference.loc[common].astype(str).to_numpy())
        seen.loc[common] += 1
    return agree / seen.replace(0, np.nan)
