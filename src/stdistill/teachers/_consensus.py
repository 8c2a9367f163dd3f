"""Consensus niche teacher and K chosen by stability (used by :class:`~stdistill.teachers.NicheTeacher`).

Why: on HER2ST a single mixture fit's partition at K=4 and K=8 changes with the PCA's trailing
components (randomized vs exact solver) and with the mixture's initialisation, so a student scored
against it is scored against a target that moves when nothing in the data moves.

Design (ours; bagging as CellCharter repeats its fits, consensus by co-association):

- **Members.** ``consensus=R`` fits R members with seeds ``seed * R + r``. Member r is fitted on a
  random 90% of the spots (:data:`MEMBER_FRACTION`): its own PCA of the standardised
  log-expression when the teacher computes one (the R PCAs are stacked, so one projection embeds
  every member) and a Gaussian mixture (one start) on its ring features; its posteriors ``P_r``
  (n, K) cover every spot.
- **Consensus.** The co-association of two spots, the chance that a member puts them in one niche,
  is ``sum_r P_r P_r^T / R``: the Gram matrix of ``H = [P_1 .. P_R] / sqrt(R)``. k-means on the rows
  of H (K clusters, 10 starts) therefore clusters the co-association matrix without building it
  (n x n). ``M_r`` (K x K): the share of member r's niche j that the consensus puts in niche c.
- **Soft labels.** ``q = mean_r P_r M_r``: the members' posteriors in consensus niche ids, for the
  fitted spots and for new ones alike. A spot's **agreement** is the share of members whose hard
  label, mapped through ``M_r``, is its consensus niche (1: every member agrees).
- **K by stability** (``n_niches="auto"`` or a range): the K whose partition reproduces best. A
  consensus teacher scores each K by the ARI between the consensus of one random half of its
  members and that of the other half (:data:`SPLITS` halvings): the reproducibility of what it
  delivers. A single-fit teacher (``consensus=1``) scores the mean ARI between every pair of
  :data:`AUTO_REPEATS` bagged fits on its one embedding. ``"auto"`` tries K from 3 to 10: a split
  into two broad compartments is the most reproducible partition of nearly any tissue (HER2ST:
  ARI 0.96 at K=2) and seldom what is wanted; pass ``(2, 10)`` to include it. CellCharter's
  ``ClusterAutoK`` instead compares runs at K with runs at K-1 and K+1 (Fowlkes-Mallows).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._pca import assemble, components, fit_pca, fit_pca_auto, in_memory, remove_rows, scatter

#: Share of spots each member is fitted on.
MEMBER_FRACTION = 0.9
#: ``n_niches="auto"``: K from 3 to 10 (CellCharter's ``ClusterAutoK`` example uses 2 to 10).
AUTO_RANGE = (3, 10)
#: Bagged fits behind the stability curve of a teacher without consensus (``consensus=1``).
AUTO_REPEATS = 10
#: Random halvings of a consensus teacher's members behind its stability score.
SPLITS = 3
SOLVERS = ("auto", "randomized", "exact")
_GMM_KEYS = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def parse_n_niches(n_niches) -> int | list[int]:
    """``n_niches`` as an int (K) or a sorted list of candidate K: ``"auto"`` (3..10), a tuple
    ``(lo, hi)`` (bounds included, as CellCharter's ``n_clusters``) or a list of K."""
    if isinstance(n_niches, str) and n_niches != "auto":
        raise StdistillError(f"n_niches must be an int, 'auto' or a range of K, got {n_niches!r}")
    if isinstance(n_niches, str):
        ks = list(range(AUTO_RANGE[0], AUTO_RANGE[1] + 1))
    elif isinstance(n_niches, tuple) and len(n_niches) == 2:
        ks = list(range(int(n_niches[0]), int(n_niches[1]) + 1))
    elif isinstance(n_niches, (list, tuple, range)):
        ks = sorted({int(k) for k in n_niches})
    else:
        ks = int(n_niches)
    if (isinstance(ks, list) and (not ks or min(ks) < 2)) or (isinstance(ks, int) and ks < 2):
        raise StdistillError(f"n_niches must be >= 2 (every candidate K), got {n_niches!r}")
    return ks


def member_seeds(seed: int, n_members: int) -> list[int]:
    """Seeds of the members of a teacher with ``seed``: disjoint sets for different seeds."""
    return [int(seed) * n_members + r for r in range(n_members)]


def member_rows(n: int, seed: int, fraction: float = MEMBER_FRACTION) -> np.ndarray:
    """Sorted indices of the ``fraction`` of ``n`` rows a member with ``seed`` is fitted on."""
    if fraction >= 1:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max(2, int(round(fraction * n))), replace=False))


# ----------------------------------------------------------------------------- embedding
def fit_member_pcas(make_blocks, n_rows: int, n_cols: int, n_pcs: int, solver: str, seeds: list[int],
                    fraction: float = MEMBER_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and stacked components (len(seeds) * n_pcs, d), float32.

    ``make_blocks(rows)``: fresh :data:`stdistill._pca.Blocks` over ``rows`` (None: all rows).
    One seed: one PCA on every row (``solver="auto"``: scikit-learn's, randomized above 500
    columns, the teacher's PCA of earlier releases; ``"exact"``: the covariance's
    eigenvectors). Several: member r's PCA on its :func:`member_rows`, scikit-learn's on the data
    assembled once, or (``"exact"``, or data past the in-memory limit) from the full scatter
    computed once, each member removing its left-out rows from it. The members are projected
    around one mean (the mean of their means), so one projection embeds them all.
    """
    if solver not in SOLVERS:
        raise StdistillError(f"pca_solver must be one of {SOLVERS}, got {solver!r}")
    sk_solver = ("randomized" if n_cols > 500 else "full") if solver == "auto" else solver
    if len(seeds) == 1:
        if solver == "exact":
            return fit_pca(make_blocks(None), n_pcs)
        return fit_pca_auto(lambda: make_blocks(None), n_rows, n_cols, n_pcs, seed=seeds[0], svd_solver=sk_solver)
    streamed = solver == "exact" or not in_memory(n_rows, n_cols)
    if streamed:
        total = scatter(make_blocks(None))
    else:
        from sklearn.decomposition import PCA

        x, _ = assemble(make_blocks(None), n_rows, n_cols)
    means, comps = [], []
    for s in seeds:
        rows = member_rows(n_rows, s, fraction)
        if streamed:
            left_out = np.setdiff1d(np.arange(n_rows), rows, assume_unique=True)
            m, c = components(remove_rows(total, scatter(make_blocks(left_out))), n_pcs)
        else:
            pca = PCA(n_components=n_pcs, random_state=s, svd_solver=sk_solver).fit(x[rows])
            m, c = pca.mean_, pca.components_
        means.append(m)
        comps.append(c)
    return np.mean(means, axis=0).astype(np.float32), np.ascontiguousarray(np.vstack(comps), dtype=np.float32)


def member_columns(n_members: int, width: int, n_rings: int, stacked: bool) -> np.ndarray:
    """(n_members, width * (n_rings + 1)) columns of the ring features each member reads.

    ``stacked``: the embedding holds the members' own PCAs side by side (``width`` columns each) and
    the ring features repeat that layout per ring; else every member reads every column."""
    if not stacked:
        return np.tile(np.arange(width * (n_rings + 1)), (n_members, 1))
    ring = n_members * width
    return np.array([np.concatenate([j * ring + r * width + np.arange(width) for j in range(n_rings + 1)])
                     for r in range(n_members)])


# ----------------------------------------------------------------------------- mixtures
def fit_gmm(x: np.ndarray, k: int, seed: int, covariance_type: str, n_init: int):
    """The teacher's Gaussian mixture (scikit-learn) fitted on ``x``."""
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(k, covariance_type=covariance_type, random_state=seed, n_init=n_init, reg_covar=1e-3,
                           max_iter=200).fit(x)


def fit_members(f: np.ndarray, k: int, seeds: list[int], cols: np.ndarray, covariance_type: str,
                fraction: float = MEMBER_FRACTION) -> tuple[list, list[np.ndarray]]:
    """Member mixtures (one start each, fitted on their :func:`member_rows`) and their
    posteriors (n, K) on every row of ``f``."""
    gmms, probs = [], []
    for s, c in zip(seeds, cols):
        x = f[:, c]
        g = fit_gmm(x[member_rows(len(f), s, fraction)], k, s, covariance_type, n_init=1)
        gmms.append(g)
        probs.append(g.predict_proba(x))
    return gmms, probs


def consensus_labels(probs: list[np.ndarray], k: int, seed: int) -> np.ndarray:
    """(n,) consensus niches: k-means on ``H = [P_1 .. P_R] / sqrt(R)`` (clusters the co-association)."""
    from sklearn.cluster import KMeans

    h = np.hstack(probs) / np.sqrt(len(probs))
    return KMeans(k, n_init=10, random_state=seed).fit_predict(h)


def _maps(probs: list[np.ndarray], labels: np.ndarray, k: int) -> np.ndarray:
    """(R, K, K): row j of map r = shares of member r's niche j in each consensus niche (a member
    niche no spot takes maps uniformly)."""
    out = np.zeros((len(probs), k, k))
    for r, p in enumerate(probs):
        np.add.at(out[r], (p.argmax(1), labels), 1.0)
        tot = out[r].sum(1, keepdims=True)
        out[r] = np.where(tot > 0, out[r] / np.maximum(tot, 1), 1.0 / k)
    return out


class ConsensusMixture:
    """R member mixtures read through their columns and maps; ``predict_proba`` gives the
    consensus soft labels ``q`` (n, K), :meth:`agreement` the members' vote share per spot."""

    def __init__(self, members: list, cols: np.ndarray, maps: np.ndarray, seeds: list[int]):
        self.members, self.cols, self.maps, self.seeds = members, np.asarray(cols), np.asarray(maps), list(seeds)

    @property
    def n_niches(self) -> int:
        return self.maps.shape[1]

    @classmethod
    def from_members(cls, gmms: list, probs: list[np.ndarray], cols: np.ndarray, seeds: list[int], seed: int):
        k = probs[0].shape[1]
        return cls(gmms, cols, _maps(probs, consensus_labels(probs, k, seed), k), seeds)

    def member_proba(self, f: np.ndarray) -> list[np.ndarray]:
        return [g.predict_proba(f[:, c]) for g, c in zip(self.members, self.cols)]

    def _combine(self, probs: list[np.ndarray]) -> np.ndarray:
        return (sum(p @ m for p, m in zip(probs, self.maps)) / len(probs)).astype(np.float32)

    def predict_proba(self, f: np.ndarray) -> np.ndarray:
        """(n, K) float32 consensus soft labels (rows sum to 1)."""
        return self._combine(self.member_proba(f))

    def agreement(self, f: np.ndarray) -> np.ndarray:
        """(n,) share of members whose mapped hard label is the consensus niche."""
        return self._agreement(self.member_proba(f))

    def _agreement(self, probs: list[np.ndarray]) -> np.ndarray:
        cons = self._combine(probs).argmax(1)
        votes = [m.argmax(1)[p.argmax(1)] == cons for p, m in zip(probs, self.maps)]
        return np.mean(votes, axis=0).astype(np.float32)


# ----------------------------------------------------------------------------- K by stability
def pairwise_ari(labels: list[np.ndarray]) -> np.ndarray:
    """ARI of every pair of partitions of the same spots."""
    from sklearn.metrics import adjusted_rand_score

    return np.array([adjusted_rand_score(a, b) for a, b in itertools.combinations(labels, 2)])


def stability_curve(f: np.ndarray, ks: list[int], seeds: list[int], cols: np.ndarray, covariance_type: str,
                    consensus_seed: int = 0, consensus: bool = False) -> tuple[pd.DataFrame, dict]:
    """Per K: mean and sd of the ARI between the members' partitions (every pair); with at least 4
    members, mean and sd over :data:`SPLITS` random halvings of the ARI between the consensus of
    each half (``split_mean``, ``split_sd``); ``score``: the split ARI for a ``consensus`` teacher
    of at least 4 members, else the pairwise mean. Returns the curve and ``{K: (gmms, probs)}`` of the members, for reuse."""
    rows, fitted = [], {}
    rng = np.random.default_rng(consensus_seed)
    halves = [rng.permutation(len(seeds)) for _ in range(SPLITS)] if len(seeds) >= 4 else []
    for k in ks:
        gmms, probs = fit_members(f, k, seeds, cols, covariance_type)
        fitted[k] = (gmms, probs)
        a = pairwise_ari([p.argmax(1) for p in probs])
        split = np.array([pairwise_ari([consensus_labels([probs[i] for i in h[: len(h) // 2]], k, consensus_seed),
                                        consensus_labels([probs[i] for i in h[len(h) // 2:]], k, consensus_seed)])[0]
                          for h in halves])
        s_mean, s_sd = (float(split.mean()), float(split.std())) if len(split) else (np.nan, np.nan)
        rows.append(dict(k=k, ari_mean=float(a.mean()), ari_sd=float(a.std()), n_pairs=len(a), split_mean=s_mean,
                         split_sd=s_sd, score=s_mean if consensus and len(split) else float(a.mean())))
    return pd.DataFrame(rows), fitted


def _columns(teacher, f: np.ndarray, n_members: int) -> np.ndarray:
    """The ring-feature columns of each of ``n_members`` members of ``teacher`` (see :func:`member_columns`)."""
    n_rings = teacher.params["n_rings"]
    if teacher.state_.get("embed_members", 1) == n_members > 1:
        return member_columns(n_members, teacher.state_["embed_width"], n_rings, stacked=True)
    return member_columns(n_members, f.shape[1] // (n_rings + 1), n_rings, stacked=False)


def fit_mixture(teacher, f: np.ndarray, k: int | None = None):
    """The teacher's mixture on ring features ``f``: ``(model, probs)``. ``k=None``: the teacher's
    ``n_niches`` (a range: chosen by :func:`stability_curve`, recorded in ``state_["stability"]``).
    One member: a scikit-learn ``GaussianMixture`` (3 starts); several: a :class:`ConsensusMixture`."""
    p = teacher.params
    n_members, spec, fitted = p["consensus"], p["n_niches"], {}
    if k is None and isinstance(spec, list):
        n_rep = n_members if n_members > 1 else AUTO_REPEATS
        curve, fitted = stability_curve(f, spec, member_seeds(p["seed"], n_rep), _columns(teacher, f, n_rep),
                                        p["covariance_type"], p["seed"], consensus=n_members > 1)
        k = int(curve.loc[curve["score"].idxmax(), "k"])
        teacher.state_["stability"] = dict(curve.to_dict("list"), chosen=k, n_repeats=n_rep, criterion=(
            "ARI between the consensus of two random halves of the members" if n_members >= 4
            else "mean ARI between every pair of bagged fits"))
    k = int(spec if k is None else k)
    if f.shape[0] < k:
        raise StdistillError(f"{f.shape[0]} spots cannot hold {k} niches")
    teacher.state_["n_niches"] = k
    if n_members == 1:
        g = fit_gmm(f, k, p["seed"], p["covariance_type"], n_init=3)
        return g, g.predict_proba(f).astype(np.float32)
    seeds, cols = member_seeds(p["seed"], n_members), _columns(teacher, f, n_members)
    gmms, probs = fitted[k] if k in fitted else fit_members(f, k, seeds, cols, p["covariance_type"])
    model = ConsensusMixture.from_members(gmms, probs, cols, seeds, p["seed"])
    teacher.fit_agreement_ = model._agreement(probs)
    return model, model._combine(probs)


def record_fit(teacher, adata, key_added: str) -> None:
    """After a fit on ``adata``: ``uns[f"{key_added}_stability"]`` (the curve, when K was chosen)
    and ``obs[f"{key_added}_agreement"]`` (consensus teachers)."""
    st = teacher.state_.get("stability")
    if st is not None:
        adata.uns[f"{key_added}_stability"] = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in st.items()}
    agreement = getattr(teacher, "fit_agreement_", None)
    if agreement is not None:
        adata.obs[f"{key_added}_agreement"] = np.asarray(agreement, dtype=np.float32)


# ----------------------------------------------------------------------------- persistence
def mixture_arrays(model) -> dict[str, np.ndarray]:
    """Arrays of a fitted mixture for safetensors (a single GaussianMixture under ``gmm.*``)."""
    if not isinstance(model, ConsensusMixture):
        return {f"gmm.{k}": np.ascontiguousarray(getattr(model, k), dtype=np.float64) for k in _GMM_KEYS}
    out = {"consensus.cols": np.ascontiguousarray(model.cols, dtype=np.float64),  # bundles check arrays as floats
           "consensus.maps": np.ascontiguousarray(model.maps, dtype=np.float64)}
    for r, g in enumerate(model.members):
        out.update({f"consensus.{r}.{k}": np.ascontiguousarray(getattr(g, k), dtype=np.float64) for k in _GMM_KEYS})
    return out


def _gmm_from(arrays: dict, prefix: str, covariance_type: str):
    from sklearn.mixture import GaussianMixture

    g = GaussianMixture(len(arrays[f"{prefix}weights_"]), covariance_type=covariance_type)
    for k in _GMM_KEYS:
        setattr(g, k, arrays[f"{prefix}{k}"])
    return g


def mixture_from_arrays(arrays: dict, covariance_type: str, seeds: list[int] | None = None):
    """The mixture written by :func:`mixture_arrays` (None if ``arrays`` holds none)."""
    if "gmm.weights_" in arrays:
        return _gmm_from(arrays, "gmm.", covariance_type)
    if "consensus.maps" not in arrays:
        return None
    maps = arrays["consensus.maps"]
    members = [_gmm_from(arrays, f"consensus.{r}.", covariance_type) for r in range(len(maps))]
    return ConsensusMixture(members, np.asarray(arrays["consensus.cols"]).astype(np.int64), maps, seeds or [])
