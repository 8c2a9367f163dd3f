"""``pp.folds(by="spatial")``: contiguous blocks of one section with a margin dropped from training."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import stdistill as sd
from stdistill import StdistillError
from stdistill.pp import WeakSplitWarning


def _grid(nx: int = 16, ny: int = 10, pitch_px: float = 20.0, mpp: float = 5.0, section: str = "S1"):
    """One section: a square grid of spots (pitch 100 um)."""
    xs, ys = np.meshgrid(np.arange(nx), np.arange(ny))
    xy = np.c_[xs.ravel(), ys.ravel()] * pitch_px + 10
    n = len(xy)
    return sd.io.new_section(sp.csr_matrix(np.ones((n, 3), np.int32)), genes=["A", "B", "C"],
                             spots=[f"{section}_{i}" for i in range(n)], xy_px=xy, section=section, patient="P",
                             microns_per_pixel=mpp, spot_diameter_um=55)


@pytest.mark.parametrize("radius_um", [None, 250.0])
def test_no_training_spot_within_the_margin_of_a_test_spot(radius_um):
    a = _grid()
    with pytest.warns(WeakSplitWarning, match="weaker check"):
        fs = sd.pp.folds(a, by="spatial", n_splits=4, radius_um=radius_um)
    xy = sd.io.spatial_um(a)
    pos = {n: i for i, n in enumerate(a.obs_names)}
    margin = fs[0].margin_um
    want = sd.pp.radius_for_neighbors(a, sd.pp.neighbors.N_NEIGHBORS) if radius_um is None else radius_um
    assert margin == pytest.approx(want) and margin > 0
    tested = []
    for f in fs:
        tr, te = xy[[pos[s] for s in f.train]], xy[[pos[s] for s in f.test]]
        d = np.sqrt(((tr[:, None, :] - te[None, :, :]) ** 2).sum(-1)).min(1)
        assert (d > margin).all()  # no training spot within the margin of a test spot
        assert len(f.dropped) > 0 and set(f.train).isdisjoint(f.test) and set(f.dropped).isdisjoint(f.train)
        assert len(f.train) + len(f.test) + len(f.dropped) == a.n_obs
        lo, hi = te[:, 0].min(), te[:, 0].max()  # a contiguous strip along the longer (x) axis
        inside = (xy[:, 0] >= lo) & (xy[:, 0] <= hi)
        assert set(a.obs_names[inside]) == set(f.test)
        tested += f.test
    assert sorted(tested) == sorted(a.obs_names)  # every spot is tested exactly once


def test_spatial_folds_refuse_in_one_line():
    a = sd.io.concat([_grid(section="S1"), _grid(section="S2")])
    with pytest.raises(StdistillError, match='splits one section, got 2'):
        sd.pp.folds(a, by="spatial")
    with pytest.raises(StdistillError, match="leaves no training spots"):
        sd.pp.folds(_grid(), by="spatial", n_splits=2, radius_um=5000)
    with pytest.raises(StdistillError, match="by patient"):
        sd.pp.folds(_grid(), by="section")
