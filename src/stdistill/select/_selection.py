"""What a choice on inner patients records: the score table, the criterion and the choice.

A :class:`Criterion` says how the table becomes one number per candidate and which candidate
wins; a :class:`Selection` holds the candidates x inner splits table, the criterion and the choice,
prints itself the same way for every recipe and goes into model bundles as plain JSON
(:meth:`Selection.to_dict` / :meth:`Selection.from_dict`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from .._errors import StdistillError

__all__ = ["Criterion", "Selection", "selection_record", "smooth_curve"]

AGGREGATES = ("mean_curve", "best_per_split")
TIES = ("first", "running")


def smooth_curve(curve: Sequence[float], k: int) -> list[float]:
    """Centred moving average over ``k`` epochs (the window shrinks at the ends; ``k <= 1``: unchanged values)."""
    v, h = np.asarray(curve, dtype=np.float64), max(int(k), 1) // 2
    return [float(np.mean(v[max(0, i - h): i + h + 1])) for i in range(len(v))]


@dataclass(frozen=True)
class Criterion:
    """How a Selection's table becomes one score per candidate, and which candidate wins.

    Parameters
    ----------
    metric
        What the scores are (e.g. ``"val_pearson"``, ``"val_cindex"``, ``"val_loss"``): a label.
    maximize
        Whether a larger score is better.
    aggregate
        For curves (a score after each epoch): ``"mean_curve"``: the curves averaged over the
        splits (cut to the shortest), then its best epoch; ``"best_per_split"``: each split's best
        score over epochs, then their mean, and the epoch is the mean of the splits' best epochs,
        rounded. Scalar scores: their mean over the splits either way.
    smooth
        Curves are first smoothed by a centred moving average over this many epochs (1: not).
    first_epoch
        The epoch of a curve's first value (0: before training; 1: after the first epoch).
    skip_nan
        Leave NaN scores of a split out of the mean (else a NaN makes the mean NaN). A NaN mean
        ranks last either way.
    tol, ties
        ``"first"``: the first listed among the candidates within ``tol`` of the best; ``"running"``:
        candidates in order, a later one replaces the best only when better by more than ``tol``.
        With ``tol=0`` both take the first listed of the exact best.
    """

    metric: str = "score"
    maximize: bool = True
    aggregate: str = "mean_curve"
    smooth: int = 1
    first_epoch: int = 0
    skip_nan: bool = False
    tol: float = 0.0
    ties: str = "first"

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise StdistillError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.ties not in TIES:
            raise StdistillError(f"ties must be one of {TIES}, got {self.ties!r}")
        if not self.tol >= 0:
            raise StdistillError(f"tol must be >= 0, got {self.tol}")

    def describe(self, curves: bool = True) -> str:
        """One line: what was maximised or minimised, and how (``curves``: scores per epoch, else one per split)."""
        how = ("mean over splits" if not curves else "mean curve over splits, then its best epoch"
               if self.aggregate == "mean_curve" else "best epoch per split, then mean over splits")
        extra = [f"smoothed over {self.smooth} epochs"] if self.smooth > 1 and curves else []
        extra += ["NaN splits skipped"] if self.skip_nan else []
        tie = f"ties: first listed{f' within {self.tol:g}' if self.tol else ''}{' (running)' if self.ties == 'running' else ''}"
        return f"{'max' if self.maximize else 'min'} {self.metric} ({'; '.join([how, *extra, tie])})"


def _nan_mean(m: np.ndarray, skip: bool) -> np.ndarray:
    """Mean over axis 0 (splits, summed in order); ``skip``: NaN entries left out."""
    if not skip:
        return np.mean(m, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        return np.nanmean(m, axis=0)


def _argbest(loss: np.ndarray) -> int:
    """First index of the smallest ``loss``, NaN last (all NaN: 0)."""
    ok = ~np.isnan(loss)
    return int(np.argmin(np.where(ok, loss, np.inf))) if ok.any() else 0


def _split_best(curves: list[list[float]], sign: float, first_epoch: int) -> tuple[np.ndarray, list[int | None]]:
    """Per split: (best signed score, its epoch); an empty or all-NaN curve gives NaN, None."""
    best, epochs = [], []
    for c in curves:
        v = sign * np.asarray(c, dtype=np.float64)
        if v.size == 0 or np.isnan(v).all():
            best.append(np.nan)
            epochs.append(None)
            continue
        i = _argbest(v)
        best.append(v[i])
        epochs.append(i + first_epoch)
    return np.asarray(best), epochs


def aggregate(table: pd.DataFrame, n_candidates: int, crit: Criterion) -> pd.DataFrame:
    """One row per candidate (``candidate``, ``score``, ``epoch``, ``loss`` = the signed score that
    is minimised, NaN for candidates without rows) from a Selection table."""
    sign = -1.0 if crit.maximize else 1.0
    curves = "curve" in table.columns
    splits = list(dict.fromkeys(table["split"])) if len(table) else []
    per = {c: g for c, g in table.groupby("candidate", sort=False)} if len(table) else {}
    rows = []
    if curves and crit.aggregate == "best_per_split":
        mats, eps = {}, {}
        for c, g in per.items():
            vals = [smooth_curve(v, crit.smooth) for v in g["curve"]]
            mats[c], eps[c] = _split_best(vals, sign, crit.first_epoch)
        mean = _matrix_mean(mats, splits, per, crit)
        for c in range(n_candidates):
            e = [x for x in eps.get(c, []) if x is not None]
            loss = mean.get(c, np.nan)
            rows.append({"candidate": c, "loss": loss, "score": sign * loss,
                         "epoch": int(round(float(np.mean(e)))) if e else None})
    elif curves:
        for c in range(n_candidates):
            loss, ep = np.nan, None
            if c in per:
                vals = [smooth_curve(v, crit.smooth) for v in per[c]["curve"]]
                n = min(map(len, vals))
                m = sign * _nan_mean(np.asarray([v[:n] for v in vals], dtype=np.float64), crit.skip_nan)
                if n:
                    i = _argbest(m)
                    loss, ep = m[i], i + crit.first_epoch
            rows.append({"candidate": c, "loss": loss, "score": sign * loss, "epoch": ep})
    else:
        mats = {c: sign * g["score"].to_numpy(np.float64) for c, g in per.items()}
        mean = _matrix_mean(mats, splits, per, crit)
        rows = [{"candidate": c, "loss": mean.get(c, np.nan), "score": sign * mean.get(c, np.nan), "epoch": None}
                for c in range(n_candidates)]
    return pd.DataFrame(rows, columns=["candidate", "loss", "score", "epoch"])


def _matrix_mean(vals: dict, splits: list, per: dict, crit: Criterion) -> dict:
    """Per candidate, the mean over splits of its per-split values, computed on one (splits x
    candidates) matrix (summed over splits in order) when every candidate has every split."""
    if not vals:
        return {}
    same = all(list(per[c]["split"]) == splits for c in vals)
    if same:
        keys = list(vals)
        m = _nan_mean(np.stack([vals[c] for c in keys], axis=1), crit.skip_nan)
        return dict(zip(keys, m))
    return {c: _nan_mean(np.asarray(v)[:, None], crit.skip_nan)[0] for c, v in vals.items()}


def pick(scores: pd.DataFrame, crit: Criterion, allowed: Sequence[bool] | None = None) -> int:
    """The winning candidate of :func:`aggregate`'s table under the criterion's tie rule, among the
    ``allowed`` ones (default: all); NaN scores rank last."""
    loss = scores["loss"].to_numpy(np.float64)
    loss = np.where(np.isnan(loss), np.inf, loss)
    idx = np.flatnonzero(np.ones(len(loss), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool))
    if not len(idx):
        raise StdistillError("no candidate passes `where` (or the table is empty)")
    if crit.ties == "running":
        best = idx[0]
        for i in idx[1:]:
            if loss[i] < loss[best] - crit.tol:
                best = i
        return int(best)
    return int(idx[np.flatnonzero(loss[idx] <= loss[idx].min() + crit.tol)[0]])


def settings_of(base: Any, update: dict, **more) -> Any:
    """``base`` (a dataclass or dict; None: empty) updated with a candidate's settings."""
    if base is None:
        return {**update, **more}
    if is_dataclass(base):
        return replace(base, **update, **more)
    return {**base, **update, **more}


@dataclass
class Selection:
    """A choice made on inner validation splits.

    ``table``: one row per candidate x split: ``candidate`` (index into ``candidates``), the
    candidate's settings, ``split``, ``curve`` (a score per epoch) or ``score``, ``seconds``.
    ``candidates``: the settings tried (dicts). ``criterion``: how they were compared.
    ``choice``: ``{"candidate", "settings", "epoch" (None for scalar scores), "score"}``.
    ``base``: the settings the candidates update (not saved by :meth:`to_dict`).
    """

    table: pd.DataFrame
    candidates: list[dict]
    criterion: Criterion
    choice: dict
    base: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_table(cls, table: pd.DataFrame, candidates: Sequence[dict], criterion: Criterion, *, base: Any = None,
                   where: Callable[[dict], bool] | None = None) -> Selection:
        """Aggregate ``table`` with ``criterion`` and choose (among ``candidates`` passing ``where``)."""
        candidates = [dict(c) for c in candidates]
        scores = aggregate(table, len(candidates), criterion)
        have = set(table["candidate"]) if len(table) else set()
        allowed = [i in have and (where is None or where(c)) for i, c in enumerate(candidates)]
        ci = pick(scores, criterion, allowed)
        ep = scores["epoch"].iloc[ci]
        choice = {"candidate": ci, "settings": dict(candidates[ci]), "epoch": None if pd.isna(ep) else int(ep),
                  "score": float(scores["score"].iloc[ci])}
        return cls(table, candidates, criterion, choice, base=base)

    def rechoose(self, where: Callable[[dict], bool] | None = None, criterion: Criterion | None = None) -> Selection:
        """The same table chosen again: among the candidates passing ``where``, or with another criterion."""
        return Selection.from_table(self.table, self.candidates, criterion or self.criterion, base=self.base, where=where)

    def scores(self) -> pd.DataFrame:
        """One row per candidate: its settings, ``score`` (aggregated by the criterion), ``epoch``."""
        agg = aggregate(self.table, len(self.candidates), self.criterion)
        sets = pd.DataFrame(self.candidates, index=range(len(self.candidates)))
        return pd.concat([agg[["candidate"]], sets, agg[["score", "epoch"]]], axis=1)

    def config(self, base: Any = None) -> Any:
        """``base`` (default: the one selected with) updated with the chosen settings and, for
        curves, ``max_epochs`` = the chosen epoch."""
        base = self.base if base is None else base
        ep = self.choice["epoch"]
        return settings_of(base, self.choice["settings"], **({"max_epochs": ep} if ep is not None else {}))

    def summary(self) -> pd.DataFrame:
        """The printed table: one row per candidate with its settings, each split's score (at the
        chosen epoch of that candidate for ``"mean_curve"``, else its best), the aggregated
        ``score``, ``epoch`` and a ``chosen`` mark."""
        sc = self.scores()
        per = self._split_scores()
        out = pd.concat([sc.drop(columns=["score", "epoch"]), per, sc[["score", "epoch"]]], axis=1)
        if out["epoch"].isna().all():
            out = out.drop(columns="epoch")
        out["chosen"] = np.where(out["candidate"] == self.choice["candidate"], "*", "")
        return out

    def _split_scores(self) -> pd.DataFrame:
        crit, sign = self.criterion, (-1.0 if self.criterion.maximize else 1.0)
        agg = aggregate(self.table, len(self.candidates), crit)
        rows = {}
        for (c, s), g in self.table.groupby(["candidate", "split"], sort=False):
            if "score" in g.columns:
                v = float(g["score"].iloc[0])
            else:
                curve = smooth_curve(g["curve"].iloc[0], crit.smooth)
                if crit.aggregate == "mean_curve":
                    ep = agg["epoch"].iloc[c]
                    v = float(curve[int(ep) - crit.first_epoch]) if not pd.isna(ep) else np.nan
                else:
                    b, _ = _split_best([curve], sign, crit.first_epoch)
                    v = float(sign * b[0])
            rows.setdefault(c, {})[str(s)] = v
        return pd.DataFrame.from_dict(rows, orient="index").reindex(range(len(self.candidates)))

    def describe(self) -> str:
        """One line: the chosen settings, epoch and score."""
        c = self.choice
        sets = ", ".join(f"{k}={_fmt(v)}" for k, v in c["settings"].items()) or "the base settings"
        ep = f", epochs={c['epoch']}" if c["epoch"] is not None else ""
        return f"chosen: {sets}{ep} ({self.criterion.metric} {c['score']:.4f}, candidate {c['candidate']})"

    def __str__(self) -> str:
        table = self.summary()
        scored = set(table.columns) - set(self.scores().columns) | {"score"}  # split scores and the mean: 4 decimals
        fmt = {c: (lambda v: f"{v:.4f}") if c in scored else _fmt for c in table.columns if table[c].dtype.kind == "f"}
        body = table.to_string(index=False, formatters=fmt)
        n = self.table["split"].nunique() if len(self.table) else 0
        return f"Selection over {len(self.candidates)} candidates x {n} splits: {self.criterion.describe('curve' in self.table)}\n{body}\n{self.describe()}"

    __repr__ = __str__

    def to_dict(self) -> dict:
        """JSON types only: ``{"criterion", "candidates", "choice", "table": {"columns", "rows"}}`` (NaN -> None)."""
        from .._json import jsonable

        return jsonable({"criterion": asdict(self.criterion), "candidates": self.candidates, "choice": self.choice,
                          "table": {"columns": list(map(str, self.table.columns)),
                                    "rows": self.table.astype(object).to_numpy().tolist()}}, finite=True)

    @classmethod
    def from_dict(cls, d: dict) -> Selection:
        """The Selection of :meth:`to_dict` (``base`` is not saved: give it to :meth:`config`)."""
        try:
            crit = Criterion(**{f.name: d["criterion"][f.name] for f in fields(Criterion) if f.name in d["criterion"]})
            t = d["table"]
            table = pd.DataFrame(t["rows"], columns=t["columns"])
            for c in table.columns:
                if c not in ("curve", "split") and table[c].map(lambda v: v is None or isinstance(v, (int, float))).all():
                    table[c] = pd.to_numeric(table[c])
            return cls(table, [dict(c) for c in d["candidates"]], crit, dict(d["choice"]))
        except (KeyError, TypeError) as e:
            raise StdistillError(f"not a Selection record ({e})") from None

    def __iter__(self):
        """Deprecated: ``config, table = select_x(...)`` (the old return) still unpacks for one release."""
        warnings.warn("unpacking a Selection as (config, table) is deprecated and will be removed in the next release; "
                      "use sel.config() and sel.table", DeprecationWarning, stacklevel=2)
        return iter((self.config(), self.table.rename(columns={"split": "val_patient"})))


def selection_record(selection: Selection | None) -> dict:
    """``{"selection": selection.to_dict()}`` for a bundle's training record (``{}`` for None)."""
    return {"selection": selection.to_dict()} if selection is not None else {}


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)
