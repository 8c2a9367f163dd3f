"""``stdistill encoders list`` and ``stdistill features`` (in-process, tiny data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import stdistill as sd
from stdistill.cli import app


@pytest.fixture
def tiny_h5ad(tmp_path):
    rng = np.random.default_rng(0)
    parts = [
        sd.io.new_section(
            rng.poisson(2, (6, 3)), genes=["a", "b", "c"], spots=[f"s{i}" for i in range(6)],
            xy_px=rng.uniform(5, 90, (6, 2)), section=f"sec{k}", patient=f"p{k}", microns_per_pixel=1.0,
            spot_diameter_um=55.0, image=rng.integers(0, 256, (100, 100, 3), dtype=np.uint8) if k < 2 else None,
        )
        for k in range(3)
    ]
    path = tmp_path / "in.h5ad"
    sd.io.write_h5ad(sd.io.concat(parts), path)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    sd.encoders.register_module("test-cli-tiny", net, mean=(0.5,) * 3, std=(0.5,) * 3, input_px=16, dim=4, overwrite=True)
    yield path
    sd.encoders.unregister("test-cli-tiny")


def test_encoders_list():
    res = CliRunner().invoke(app, ["encoders", "list"], terminal_width=200)
    assert res.exit_code == 0, res.output
    for word in ("effnet-lite0-imagenet", "uni2-h", "virchow2", "conch", "1280", "CC-BY-NC-ND-4.0", "usable offline"):
        assert word in res.output


def test_features_command_then_cache_hit(tiny_h5ad, tmp_path):
    out = tmp_path / "out.h5ad"
    args = ["features", str(tiny_h5ad), "--encoder", "test-cli-tiny", "--out", str(out), "--px", "16",
            "--size-um", "20", "--batch-size", "4", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(app, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "left out 1 section(s) without an image: ['sec2']" in res.output
    assert "0 cache hits" in res.output and "wall" in res.output
    a = sd.io.read_h5ad(out)
    assert a.obsm["X_test-cli-tiny"].shape == (12, 4) and a.obsm["X_test-cli-tiny"].dtype == np.float32
    res = CliRunner().invoke(app, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    assert res.output.count("cache hit") >= 2 and "2 cache hits, 0 patches computed" in res.output
    np.testing.assert_array_equal(sd.io.read_h5ad(out).obsm["X_test-cli-tiny"], a.obsm["X_test-cli-tiny"])


def test_features_command_bad_output_name(tiny_h5ad, tmp_path):
    res = CliRunner().invoke(app, ["features", str(tiny_h5ad), "--out", str(tmp_path / "x.csv")])
    assert res.exit_code != 0
    assert "must end in .h5ad" in str(res.exception) or "must end in .h5ad" in res.output
