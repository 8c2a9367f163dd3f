"""Niche maps: the H&E-safe palette shared with the slide maps, legends outside and never clipped,
one map per section."""

import numpy as np
import pandas as pd
from _io_helpers import colour_sections
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

import stdistill as sd
from stdistill.slide import PALETTE


def _labelled():
    a = colour_sections(2, side=4)
    rng = np.random.default_rng(0)
    a.obs["niche"] = pd.Categorical(rng.integers(0, 4, a.n_obs).astype(str))
    a.obs["other"] = pd.Categorical(rng.integers(0, 3, a.n_obs).astype(str))
    return a


def test_single_panel_legend_outside_and_kept(tmp_path):
    a = _labelled()
    assert sd.pl.NICHE_PALETTE == PALETTE  # one definition for slide maps and pl.niches
    fig = sd.pl.niches(a, ["niche"], section="S0", path=tmp_path / "m.png")
    ax = fig.axes[0]
    cols = {tuple(np.round(c[:3], 3)) for c in ax.collections[0].get_facecolors()}
    assert cols <= {tuple(np.round(to_rgba(h)[:3], 3)) for h in PALETTE}
    r = FigureCanvasAgg(fig).get_renderer()
    leg = ax.get_legend()
    assert leg is not None and len(leg.get_texts()) == 4 and leg.get_texts()[0].get_text() == "niche 0"
    assert leg.get_window_extent(r).x0 >= ax.get_window_extent(r).x1  # outside the image
    tight = fig.get_tightbbox(r)  # what bbox_inches="tight" saves (inches)
    box = leg.get_window_extent(r).transformed(fig.dpi_scale_trans.inverted())
    assert tight.x1 >= box.x1 - 1e-6 and tight.y0 <= box.y0 + 1e-6
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_maps_for_every_section(tmp_path):
    a = _labelled()
    paths = sd.pl.niche_maps_per_section(a, ["niche", "other"], tmp_path / "n.png")
    assert [p.rsplit("_", 1)[-1] for p in paths] == ["S0.png", "S1.png"]
    assert all((tmp_path / f"n_{s}.png").exists() for s in ("S0", "S1"))
    one = sd.pl.niche_maps_per_section(sd.io.subset_sections(a, ["S1"]), ["niche"], tmp_path / "one.png")
    assert one == [str(tmp_path / "one.png")]


def test_legend_names_niches_by_their_marker_genes():
    a = _labelled()
    names = ["0: KRT19/ERBB2", "1: CD3E/CD2", "2: COL1A1/DCN", "3: MKI67/TOP2A"]
    fig = sd.pl.niches(a, ["niche"], section="S0", names=names)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts == [f"niche {n}" for n in names]
