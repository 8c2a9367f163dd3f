"""The same call twice gives identical numbers on CPU, for every recipe (small data).

Identical means bit-identical (``assert_array_equal``), not close: seeds are set inside each
fit, data order is seeded, and nothing depends on wall-clock or global random state.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _io_helpers import colour_sections
from conftest import TINY_EFF, TINY_VIT

import stdistill as sd


def _twice(fn):
    """Run ``fn`` twice, disturbing global random state in between (a fit must not depend on it)."""
    import torch

    first = fn()
    np.random.seed(12345)
    torch.manual_seed(12345)
    np.random.rand(7)
    torch.rand(7)
    return first, fn()


def test_niche_teacher_and_student_are_deterministic():
    from test_niches import toy

    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    def run():
        a = toy(n_patients=3, grid=6, n_genes=20)
        NicheTeacher(3, seed=0).fit_predict(a)
        s = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=2, seed=0).fit(a)
        return a.obsm["niche_probs"], s.predict_proba(a)

    (t1, s1), (t2, s2) = _twice(run)
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.usefixtures("tiny_encoders")
def test_peka_is_deterministic(tmp_path):
    from stdistill.recipes import PekaConfig

    def run():
        a = colour_sections(3, 4, [f"G{i}" for i in range(8)], 0)
        a.obsm["X_teacher"] = np.random.default_rng(0).normal(size=(a.n_obs, 4)).astype(np.float32)
        cfg = PekaConfig(adapter="lora", rank=4, lr=1e-2, max_epochs=2, batch_size=8, n_clusters=2, size_um=32, px=32,
                         val_metric="head", train_positions=None)
        m = sd.recipes.peka(a, "X_teacher", list(a.var_names[:4]), train_sections=["S0", "S1"], val_sections=["S2"],
                            encoder=TINY_VIT, config=cfg, cache_dir=False, key_added="X_peka")
        return a.obsm["X_peka"], m.predict(a, inplace=False).to_numpy(), [h.get("val_score") for h in m.history_]

    (f1, p1, h1), (f2, p2, h2) = _twice(run)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(p1, p2)
    assert h1 == h2


@pytest.mark.usefixtures("tiny_encoders")
def test_stamp_is_deterministic():
    from stdistill.recipes import StampConfig

    def run():
        a = colour_sections(3, 4, None, 0, feature_key="colour")
        col = np.asarray(a.obsm.pop("colour"))[:, :3]
        act = col @ np.random.default_rng(0).normal(size=(3, 4))
        a.obsm["pathway_scores"] = pd.DataFrame(act, index=a.obs_names, columns=[f"PW{i}" for i in range(4)])
        cfg = StampConfig(adapter="lora", rank=4, lr=1e-2, max_epochs=2, batch_size=8, size_um=32, px=32, proj_dim=8,
                          val_metric="head")
        sd.recipes.stamp(a, "pathway_scores", train_sections=["S0", "S1"], val_sections=["S2"], encoder=TINY_EFF,
                         config=cfg, cache_dir=False)
        return a.obsm["X_stamp"], a.obsm["pathway_pred"].to_numpy()

    (f1, p1), (f2, p2) = _twice(run)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(p1, p2)


def test_genst_is_deterministic():
    pytest.importorskip("vector_quantize_pytorch")
    from stdistill.recipes import GenST, GenstConfig

    a = sd.datasets.simulated(n_sections=2, n_patients=2, spots_per_section=80, n_genes=500, seed=0)
    P = a.obsm["celltype_props"].to_numpy()
    a.obsm["X_f"] = (P @ np.random.default_rng(0).normal(size=(P.shape[1], 12))).astype(np.float32)
    pats = a.obs["patient"].astype(str).to_numpy()
    tr, va = a[pats == "simP0"].copy(), a[pats == "simP1"].copy()
    genes = sd.pp.hest_genes(tr, 10)
    cfg = GenstConfig(codebook_size=8, hist_codebook_size=8, expr_epochs=5, max_epochs=3, batch_size=32)

    def run():
        m = GenST(cfg, feature_key="X_f").fit(tr, genes, val=va)
        return m.predict(va, inplace=False).to_numpy(), m.sample(va, 2, seed=1, inplace=False)

    (p1, s1), (p2, s2) = _twice(run)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))


class _TinyModule(__import__("lightning").LightningModule):
    def __init__(self):
        super().__init__()
        self.w = __import__("torch").nn.Linear(2, 1)
        self.seen_deterministic = None

    def training_step(self, batch, _i):
        import torch

        self.seen_deterministic = torch.are_deterministic_algorithms_enabled()
        return self.w(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        import torch

        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_is_deterministic_while_fitting_and_leaves_no_process_wide_flag():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from stdistill._lightning import make_trainer, quiet

    before = torch.are_deterministic_algorithms_enabled()
    trainer = make_trainer(max_epochs=1, monitor=None, accelerator="cpu", devices=1, enable_progress_bar=False)
    assert torch.are_deterministic_algorithms_enabled() == before  # the constructor's flag is undone
    mod = _TinyModule()
    with quiet():
        trainer.fit(mod, DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4))
    assert mod.seen_deterministic is True  # on while fitting
    assert torch.are_deterministic_algorithms_enabled() == before  # and restored afterwards
