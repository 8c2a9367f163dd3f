"""Two CPU processes (Lightning ddp_spawn, gloo) give the same features as one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import stdistill as sd
from stdistill.features.cache import FeatureCache


def make_sections(n_sections=3, n_spots=7, seed=1):
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(n_sections):
        parts.append(sd.io.new_section(
            rng.poisson(2, (n_spots, 3)), genes=["a", "b", "c"], spots=[f"s{i}" for i in range(n_spots)],
            xy_px=rng.uniform(5, 90, (n_spots, 2)), section=f"sec{k}", patient=f"p{k}", microns_per_pixel=1.0,
            spot_diameter_um=55.0, image=rng.integers(0, 256, (100, 100, 3), dtype=np.uint8),
        ))
    return sd.io.concat(parts)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))
    sd.encoders.register_module("test-ddp-tiny", net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_px=32, dim=16,
                                overwrite=True)
    try:
        kw = {"size_um": 20, "px": 32, "batch_size": 4, "device": "cpu", "precision": "fp32"}
        one = make_sections()
        sd.features.extract(one, "test-ddp-tiny", cache_dir=tmp_path / "one", **kw)
        two = make_sections()
        rep = sd.features.run_extraction(two, "test-ddp-tiny", cache_dir=tmp_path / "two",
                                         strategy="ddp_spawn", devices=2, **kw)
        assert rep.patches_computed == 21 and [s.status for s in rep.sections] == ["computed"] * 3
        a, b = one.obsm["X_test-ddp-tiny"], two.obsm["X_test-ddp-tiny"]
        assert np.isfinite(b).all()
        print(f"2 processes vs 1: max |difference| = {np.abs(b - a).max():.3g} over {a.size} values")
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
        # gathered into the cache (one entry per section), shards cleaned up; a rerun is a hit
        assert len(FeatureCache(tmp_path / "two").entries("test-ddp-tiny")) == 3
        assert not any((tmp_path / "two" / ".shards").glob("*/rank*.npz"))
        rep = sd.features.run_extraction(make_sections(), "test-ddp-tiny", cache_dir=tmp_path / "two", **kw)
        assert [s.status for s in rep.sections] == ["cache hit"] * 3
    finally:
        sd.encoders.unregister("test-ddp-tiny")
