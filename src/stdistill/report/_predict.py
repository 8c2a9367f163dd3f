"""Report contents for a ``stdistill predict`` output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .._keys import Key
from ._common import _figures, _read_json, _spread, _table, encoder_rows


def _niche_table(a) -> pd.DataFrame:
    """Per predicted niche: tiles, share of tiles, and the assigned probability (mean +- sd)."""
    probs = np.asarray(a.obsm[Key.obsm.probs(Key.obs.niche_pred)])
    names = a.obs[Key.obs.name(Key.obs.niche_pred)] if Key.obs.name(Key.obs.niche_pred) in a.obs else a.obs[Key.obs.niche_pred]
    codes = np.asarray(a.obs[Key.obs.niche_pred].cat.codes) if hasattr(a.obs[Key.obs.niche_pred], "cat") else np.argmax(probs, 1)
    rows = []
    for k in range(probs.shape[1]):
        hit = codes == k
        label = str(names[hit].iloc[0]) if hit.any() else f"niche {k}"
        rows.append({"niche": label, "tiles": int(hit.sum()), "share of tiles": f"{hit.mean():.1%}",
                     "probability of the assigned niche": _spread(probs[hit, k]) if hit.any() else ""})
    return pd.DataFrame(rows)


def _value_table(frame: pd.DataFrame, unit: str) -> pd.DataFrame:
    """Per predicted gene or pathway: mean +- sd over tiles, and the 5th-95th percentile range."""
    v = frame.to_numpy(dtype=float)
    lo, hi = np.nanpercentile(v, 5, axis=0), np.nanpercentile(v, 95, axis=0)
    return pd.DataFrame({"output": frame.columns.astype(str),
                         f"{unit} (mean +- sd over tiles)": [_spread(v[:, j]) for j in range(v.shape[1])],
                         "5th-95th percentile": [f"{a:.3g} to {b:.3g}" for a, b in zip(lo, hi)]})


def _run_rows(folder: Path, run: dict, record: dict, a) -> list[tuple[str, str]]:
    enc, patch, train = record.get("encoder", {}), record.get("patch", {}), record.get("training", {})
    rows = [("slide", f"{Path(run['slide']).name} (digest {run.get('slide_digest', '?')})"),
            ("microns per pixel", f"{run.get('mpp')}"),
            ("tissue tiles", f"{run.get('n_tiles', a.n_obs)} (least tissue fraction {run.get('min_tissue')})"),
            ("model bundle", f"{Path(run.get('bundle', '')).name} (recipe {record.get('recipe', run.get('recipe'))}, "
                             f"made with stdistill {record.get('stdistill_version', '?')})"),
            ("encoder", f"{enc.get('name', '?')} (weights digest {enc.get('weights_digest', '?')})"),
            ("patch", f"{patch.get('size_um', '?')} um at {patch.get('px', '?')} px; precision "
                      f"{record.get('precision', '?')}; feature normalisation {record.get('feature_norm', '?')}")]
    if train:
        rows.append(("training data", f"{train.get('n_train_spots', '?')} spots from sections "
                                      f"{', '.join(map(str, train.get('train_sections', [])))} of patients "
                                      f"{', '.join(map(str, train.get('train_patients', [])))}"))
    if Key.obs.tissue_fraction in a.obs:
        rows.append(("tissue fraction per tile", _spread(a.obs[Key.obs.tissue_fraction].to_numpy())))
    return rows


def collect_predict(folder: Path) -> dict:
    """Run, model, encoder licence, per-output summaries and the maps of a predict folder."""
    from ..io.h5ad import open_h5ad

    run = _read_json(folder / "run.json")
    h5 = folder / f"{Path(run['slide']).stem}.h5ad"
    a = open_h5ad(h5 if h5.is_file() else sorted(folder.glob("*.h5ad"))[0], "prediction .h5ad")
    pred = a.uns.get(Key.uns.predict, {})
    record = json.loads(pred["bundle"]) if isinstance(pred.get("bundle"), str) else {}
    about = run.get("about", {})
    tables = []
    if Key.obsm.probs(Key.obs.niche_pred) in a.obsm:
        tables.append(_table("Predicted niches", _niche_table(a), "shares over tissue tiles; the probability the "
                             "student gives the niche it assigns (mean +- sd over those tiles)"))
    for key in sorted(k for k in a.obsm if k.endswith("_pred") and isinstance(a.obsm[k], pd.DataFrame)):
        unit = "log1p expression" if key == "genes_pred" else "score"
        tables.append(_table(f"Predicted {key[:-5]}", _value_table(a.obsm[key], unit), "over tissue tiles"))
    notes = ["Predictions from H&E alone: no measured expression is shown; read maps as the student's estimate."]
    return {"title": f"stdistill predict: {Path(run['slide']).name}", "kind": "slide prediction",
            "command": about.get("command", ""), "run": _run_rows(folder, run, record, a),
            "versions": about.get("versions", {}),
            "encoders": encoder_rows([record.get("encoder", {}).get("name", "")], record.get("encoder")),
            "tables": tables, "figures": _figures(folder), "notes": notes}
