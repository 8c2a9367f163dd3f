"""Small survival cohorts and the files the field writes (TRIDENT/CLAM .h5, clinical and RNA tables)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

import stdistill as sd
from stdistill.recipes import Cohort


def hallmark_genes(n_sets: int = 3, per_set: int = 6) -> tuple[list[str], dict[str, list[str]]]:
    """Real Hallmark symbols (so the default gene families apply): the first genes of a few sets."""
    net = sd.pp.genesets("hallmark")
    sets = {k: list(v)[:per_set] for k, v in list(net.groupby("source", sort=False)["target"])[:n_sets]}
    return list(dict.fromkeys(g for v in sets.values() for g in v)), sets


def tiny_cohort(n: int = 24, d: int = 8, seed: int = 0, signal: float = 1.0) -> Cohort:
    """``n`` patients, one slide each (bags of 4-9 instances, d features), RNA over Hallmark genes;
    a hidden risk ``a`` shifts the bags and the first family's genes; exponential times."""
    rng = np.random.default_rng(seed)
    genes, sets = hallmark_genes()
    a = rng.normal(size=n)
    pats = [f"P{i:02d}" for i in range(n)]
    rna = pd.DataFrame(rng.normal(size=(n, len(genes))), index=pats, columns=genes)
    rna[list(sets.values())[0]] += signal * a[:, None]
    bags = {f"{p}-S1": (rng.normal(size=(int(rng.integers(4, 10)), d)) + signal * a[i]).astype(np.float32)
            for i, p in enumerate(pats)}
    T, C = rng.exponential(np.exp(-a)), rng.exponential(2.0, n)
    table = pd.DataFrame({"time": np.round(np.minimum(T, C), 4) + 0.01, "event": (T <= C).astype(int),
                          "hazard_true": a, "age": rng.normal(60, 10, n)}, index=pats)
    return Cohort(table, bags, {f"{p}-S1": p for p in pats}, rna=rna)


def write_h5(path: Path, feats: np.ndarray, coords: np.ndarray | None = None, trident: bool = True) -> Path:
    """A feature file as TRIDENT (attributes on ``coords``) or CLAM writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        if coords is not None:
            ds = f.create_dataset("coords", data=coords)
            if trident:
                ds.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                                 "target_magnification": 20, "overlap": 0})
    return path


def write_tcga_like(root: Path, cohort: Cohort) -> dict[str, Path]:
    """The cohort as files: TRIDENT job folder (slides ``<patient>-01Z-00-DX1``), a clinical CSV
    (cBioPortal-style status strings) and a genes x samples RNA TSV with sample barcodes."""
    feat_dir = root / "trident" / "20x_256px_0px_overlap" / "features_test_enc"
    for s, p in cohort.slide_patient.items():
        b = cohort.bags[s]
        xy = np.c_[np.arange(len(b)) % 3, np.arange(len(b)) // 3] * 512.0
        write_h5(feat_dir / f"{p}-01Z-00-DX1.h5", b, xy)
    t = cohort.table
    clin = pd.DataFrame({"patient": t.index, "OS_MONTHS": t["time"].to_numpy(),
                         "OS_STATUS": np.where(t["event"] == 1, "1:DECEASED", "0:LIVING"), "age": t["age"].to_numpy()})
    clin.to_csv(root / "clinical.csv", index=False)
    rna = cohort.rna.T.copy()
    rna.columns = [f"{p}-01A" for p in rna.columns]
    rna.index.name = "gene"
    rna.to_csv(root / "rna.tsv", sep="\t")
    return {"features": root / "trident" / "20x_256px_0px_overlap", "clinical": root / "clinical.csv", "rna": root / "rna.tsv"}
