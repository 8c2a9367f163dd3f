"""Kaplan-Meier curves of a cohort's predicted risk groups, with the log-rank p (lifelines).

The groups are the survival model's own: risk above the cut stored in its bundle (``risk_cut``
in ``summary.csv``) is ``high risk``. A patient with several slides gets the mean of their risks,
grouped by the same cut. Needs ``pip install 'stdistill[survival]'``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._utils import atomic_path


def _groups(summary: pd.DataFrame, clinical: str | os.PathLike) -> pd.DataFrame:
    """One row per patient (or slide, when the clinical table has a ``slide_id`` column) with
    ``time``, ``event``, ``risk`` and ``group``."""
    from ..io._cohort import read_clinical

    ok = summary[(summary["status"] == "ok") & summary["risk"].notna()] if "risk" in summary else summary.iloc[:0]
    if ok.empty:
        raise StdistillError("no slide has a predicted risk (--clinical needs a survival model)", clinical)
    cut = float(ok["risk_cut"].iloc[0])
    head = pd.read_csv(clinical, nrows=0).columns
    by = "slide_id" if "slide_id" in head else "patient"
    table = read_clinical(clinical, patient_col=by)
    risk = ok.assign(**{by: ok[by].astype(str)}).groupby(by)["risk"].mean()
    both = table.join(risk, how="inner")
    if both.empty:
        raise StdistillError(f"no {by} of the clinical table has a predicted slide (clinical: {list(table.index)[:3]}, "
                             f"slides: {list(risk.index)[:3]})", clinical)
    both["group"] = np.where(both["risk"] > cut, "high risk", "low risk")
    return both


def km_report(summary_csv: str | os.PathLike, clinical: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write ``km.png`` (Kaplan-Meier curve per predicted group) and ``km.json`` (patients, events
    and median survival per group, log-rank p) into ``out_dir``; returns the ``km.json`` record."""
    try:
        from lifelines import KaplanMeierFitter
        from lifelines.statistics import logrank_test
    except ImportError:
        raise StdistillError("Kaplan-Meier curves need lifelines: pip install 'stdistill[survival]'") from None
    from matplotlib.figure import Figure

    out = Path(out_dir)
    d = _groups(pd.read_csv(summary_csv), clinical)
    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    ax = fig.add_subplot()
    rec: dict = {"n": int(len(d)), "groups": {}}
    for g, part in d.groupby("group"):
        km = KaplanMeierFitter().fit(part["time"], part["event"], label=f"{g} (n={len(part)})")
        km.plot_survival_function(ax=ax, ci_show=len(part) > 1)
        med = float(km.median_survival_time_)
        rec["groups"][g] = {"n": int(len(part)), "events": int(part["event"].sum()),
                            "median_time": med if np.isfinite(med) else None}
    if d["group"].nunique() == 2:
        hi, lo = d[d["group"] == "high risk"], d[d["group"] == "low risk"]
        rec["logrank_p"] = float(logrank_test(hi["time"], lo["time"], hi["event"], lo["event"]).p_value)
    else:
        rec["logrank_p"] = None  # one group only: nothing to compare
    p = rec["logrank_p"]
    ax.set_title("predicted risk groups" + (f", log-rank p = {p:.3g}" if p is not None else " (one group only)"))
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    with atomic_path(out / "km.png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})
    with atomic_path(out / "km.json") as tmp:
        tmp.write_text(json.dumps(rec, indent=1))
    return rec
