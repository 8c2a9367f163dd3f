"""Pathway activities: the GMT reader, the shipped gene sets and ``pp.pathway_scores``."""

import hashlib
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stdistill._errors import StdistillError
from stdistill.pp import genesets, pathway_scores, read_gmt
from stdistill.pp._pathways import _shipped

HALLMARK_SHA256 = "4803c09aae50bbd96d53fc681bd5545a4c89278993c15145dd7b7c994f893516"


def _decoupler():
    try:
        import decoupler
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"decoupler 2.x is not installed ({e}); pip install 'stdistill[pathways]'")
    return decoupler


def _write_gmt(path, lines):
    path.write_text("".join(lines))
    return path


@pytest.fixture
def toy(tmp_path):
    """60 spots x 40 genes of raw counts in 2 sections, three gene sets (SET_C has 1 gene in the data)."""
    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(40)]
    counts = rng.poisson(rng.gamma(2.0, 3.0, size=(60, 40))).astype(np.float32)
    counts[:30, :8] += rng.poisson(6.0, size=(30, 8))  # SET_A high in section s1
    counts[:, 39] = 0  # a gene in SET_B that is never detected
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"spot{i}" for i in range(60)]),
                       var=pd.DataFrame(index=genes))
    adata.obs["section"] = pd.Categorical(["s1"] * 30 + ["s2"] * 30)
    adata.obs.loc[adata.obs_names[::7], "section"] = "s2"
    gmt = _write_gmt(tmp_path / "toy.gmt", [
        "SET_A\tgenes up in A\t" + "\t".join(genes[:10]) + "\n",
        "SET_B\thttp://example.org/B\t" + "\t".join(genes[20:30] + ["G39", "NOT_IN_DATA"]) + "\t\r\n",
        "\n",
        "SET_C\tsmall\tG05\tABSENT1\tABSENT2\n",
    ])
    return adata, gmt


def _cp10k_log1p(adata):
    X = adata.X.toarray().astype(np.float64)
    return np.log1p(X / X.sum(1, keepdims=True) * 1e4)


def test_gmt_description_with_spaces_never_becomes_genes(tmp_path):
    gmt = _write_gmt(tmp_path / "d.gmt", ["MY_SET\tGenes up in treated cells\tTP53\tMDM2\tTP53\t\n",
                                          "OTHER\tna\tEGFR\r\n"])
    sets = read_gmt(gmt)
    assert sets == {"MY_SET": ["TP53", "MDM2"], "OTHER": ["EGFR"]}
    dc = pytest.importorskip("decoupler", reason="decoupler not installed: skipping the comparison half")
    theirs = dc.pp.read_gmt(str(gmt))
    fake = set(theirs.loc[theirs["source"] == "MY_SET", "target"]) - {"TP53", "MDM2"}
    assert {"up", "in", "treated", "cells"} <= fake  # decoupler's whitespace split invents genes


@pytest.mark.parametrize("line, lineno", [("ONLY_NAME\tdesc\n", 2), ("NAME_ONLY\n", 2), ("\tdesc\tTP53\n", 2)])
def test_malformed_gmt_names_file_and_line(tmp_path, line, lineno):
    gmt = _write_gmt(tmp_path / "bad.gmt", ["OK\tdesc\tTP53\n", line])
    with pytest.raises(StdistillError) as e:
        read_gmt(gmt)
    msg = str(e.value)
    assert "bad.gmt" in msg and f"line {lineno}" in msg and "\n" not in msg


def test_missing_gmt_and_unknown_name(tmp_path):
    with pytest.raises(StdistillError, match="nope.gmt: GMT file does not exist"):
        read_gmt(tmp_path / "nope.gmt")
    with pytest.raises(StdistillError, match="not a shipped gene-set collection"):
        genesets("hallmarks")


def test_shipped_genesets():
    with _shipped("h.all.v7.0.symbols.gmt").open("rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == HALLMARK_SHA256
    h = genesets("hallmark")
    assert list(h.columns) == ["source", "target", "weight"]
    assert h["source"].nunique() == 50 and len(h) == 7322 and (h["weight"] == 1.0).all()
    p = genesets("progeny")
    assert p["source"].nunique() == 14 and len(p) == 1400
    assert (p.groupby("source").size() == 100).all() and (p["weight"] < 0).any()
    for name in ("NOTICE-MSigDB-Hallmark-CC-BY-4.0.txt", "LICENSE-progeny-Apache-2.0.txt", "SOURCE.md"):
        assert _shipped(name).is_file()


def test_user_table(tmp_path):
    csv = tmp_path / "net.tsv"
    csv.write_text("source\ttarget\nP\tA\nP\tB\n")
    assert genesets(csv)["weight"].tolist() == [1.0, 1.0]
    csv.write_text("source\ttarget\nP\tA\nP\tA\n")
    with pytest.raises(StdistillError, match="net.tsv: .*duplicated"):
        genesets(csv)


def test_mean_z_equals_numpy(toy):
    adata, gmt = toy
    with pytest.warns(UserWarning, match="dropped 1 of 3 gene sets"):
        pathway_scores(adata, gmt, method="mean_z")
    got = adata.obsm["pathway_scores"]
    assert list(got.columns) == ["SET_A", "SET_B"] and got.index.equals(adata.obs_names)
    assert adata.uns["pathway_scores"]["n_genes"] == {"SET_A": 10, "SET_B": 10}
    L = _cp10k_log1p(adata)
    with np.errstate(invalid="ignore"):  # G39 is never detected: sd 0
        Z = (L - L.mean(0)) / L.std(0)
    want_a = Z[:, :10].mean(1)
    want_b = Z[:, 20:30].mean(1)
    np.testing.assert_allclose(got["SET_A"], want_a, atol=1e-10)
    np.testing.assert_allclose(got["SET_B"], want_b, atol=1e-10)
    assert got.loc[adata.obs["section"] == "s1", "SET_A"].mean() > 0


def test_mean_z_signed_weights_dense():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(25, 6))
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=list("ABCDEF")))
    net = pd.DataFrame({"source": ["P"] * 5, "target": list("ABCDE"), "weight": [2.0, -1.0, 0.5, 1.0, -3.0]})
    pathway_scores(adata, net, method="mean_z", normalize=False)
    Z = (X - X.mean(0)) / X.std(0)
    w = net["weight"].to_numpy()
    np.testing.assert_allclose(adata.obsm["pathway_scores"]["P"], Z[:, :5] @ w / np.abs(w).sum(), atol=1e-10)
    adata.X[3] = 0.0  # a spot without counts has no score (as in decoupler)
    pathway_scores(adata, net, method="mean_z", normalize=False)
    assert np.isnan(adata.obsm["pathway_scores"]["P"].iloc[3])
    assert adata.obsm["pathway_scores"]["P"].drop(adata.obs_names[3]).notna().all()


def test_ulm_equals_decoupler(toy):
    dc = _decoupler()
    adata, gmt = toy
    X_before = adata.X.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pathway_scores(adata, gmt, method="ulm")
    ref = ad.AnnData(X=sp.csr_matrix(_cp10k_log1p(adata)), obs=pd.DataFrame(index=adata.obs_names),
                     var=pd.DataFrame(index=adata.var_names))
    net = genesets(gmt)
    dc.mt.ulm(ref, net, tmin=5)
    want = ref.obsm["score_ulm"][["SET_A", "SET_B"]]
    np.testing.assert_allclose(adata.obsm["pathway_scores"].to_numpy(), want.to_numpy(), atol=1e-6)
    assert (adata.X != X_before).nnz == 0  # the user's counts are untouched


def test_weighted_ulm_progeny_equals_decoupler():
    dc = _decoupler()
    net = genesets("progeny")
    rng = np.random.default_rng(2)
    genes = list(dict.fromkeys(net["target"]))[:400] + [f"BG{i}" for i in range(100)]
    counts = sp.random(40, len(genes), density=0.3, format="csr", random_state=3,
                       data_rvs=lambda n: rng.integers(1, 20, n)).astype(np.float64)
    adata = ad.AnnData(X=counts, var=pd.DataFrame(index=genes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = pathway_scores(adata, "progeny", method="ulm", copy=True)
    ref = ad.AnnData(X=counts.copy(), var=pd.DataFrame(index=genes))
    import scanpy as sc
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    dc.mt.ulm(ref, net, tmin=5)
    got = out.obsm["pathway_scores"]
    np.testing.assert_allclose(got.to_numpy(), ref.obsm["score_ulm"][got.columns].to_numpy(), atol=1e-6)


@pytest.mark.parametrize("method", ["mean_z", "ulm"])
def test_standardize_section(toy, method):
    if method != "mean_z":
        _decoupler()
    adata, gmt = toy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pathway_scores(adata, gmt, method=method, standardize="section", key_added="pw")
    s = adata.obsm["pw"]
    for sec in ("s1", "s2"):
        part = s[(adata.obs["section"] == sec).to_numpy()]
        np.testing.assert_allclose(part.mean(), 0.0, atol=1e-10)
        np.testing.assert_allclose(part.std(ddof=0), 1.0, atol=1e-10)
    assert adata.uns["pw"]["params"]["standardize"] == "section"


def test_copy_leaves_input_untouched(toy):
    adata, gmt = toy
    X_before = adata.X.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = pathway_scores(adata, gmt, method="mean_z", copy=True)
        assert pathway_scores(adata.copy(), gmt, method="mean_z") is None
    assert out is not adata and "pathway_scores" in out.obsm
    assert "pathway_scores" not in adata.obsm and "pathway_scores" not in adata.uns
    assert (adata.X != X_before).nnz == 0 and out.obs_names.equals(adata.obs_names)


def test_no_matching_genes_is_one_line_error(toy):
    adata, _ = toy
    lower = adata.copy()
    lower.var_names = [g.lower() for g in adata.var_names]  # symbols are matched case-sensitively
    with pytest.raises(StdistillError) as e:
        pathway_scores(lower, "hallmark", method="mean_z")
    assert "no gene set has >= 5" in str(e.value) and "\n" not in str(e.value)


def test_bad_arguments(toy):
    adata, gmt = toy
    with pytest.raises(StdistillError, match="unknown method"):
        pathway_scores(adata, gmt, method="gsea")
    with pytest.raises(StdistillError, match="obs\\['batch'\\]"):
        pathway_scores(adata, gmt, method="mean_z", standardize="section", section_key="batch")
    neg = adata.copy()
    neg.X = neg.X.toarray() - 1.0
    with pytest.raises(StdistillError, match="normalize=True needs raw counts"):
        pathway_scores(neg, gmt, method="mean_z")
