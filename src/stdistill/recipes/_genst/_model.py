"""GenST as an estimator (:class:`GenST`): fit, predict, sample, interpretation, save/load."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..._api import deliver, write_or_return
from ..._errors import StdistillError
from ..._json import jsonable
from ..._keys import Key
from ..._threads import torch_threads
from ..._utils import load_state, seed_everything
from ...bundle import Bundled
from ...metrics import pearson_per_gene
from ...select import Selection, selection_record
from ._config import GenstConfig
from ._data import _counts, _expr_inputs, _frame, _tempered, _zscore_fit, codebook_stats
from ._modules import AlignModule, ExprVQModule, HistVQModule, _fit_module, generated_pearson
from ._nets import GenstNet
from ._pixels import channel_stats, patch_pixels, scale_pixels

__all__ = ["GenST"]

_FORMAT = "stdistill.GenST/2"
_PREP = ("feat_mean", "feat_sd", "expr_mean", "expr_sd", "y_mean", "y_sd")


class GenST(Bundled):
    """GenST as an estimator: ``fit`` on training spots (counts + patch features), then ``predict``
    / ``sample`` expression on any spots or H&E-only tiles with the same encoder's features.

    Parameters
    ----------
    config
        A :class:`GenstConfig`; keyword ``overrides`` replace its fields.
    feature_key
        ``obsm`` key of the (n_spots, D) patch features (``stdistill.features.extract``).
    accelerator, devices
        Lightning's settings (CPU by default: the nets are small).
    num_threads
        torch CPU threads while training and generating (restored afterwards; ``None``: leave as
        is). One thread is fastest for these small nets: on a busy 2-core machine two threads made
        training over 30x slower.
    """

    def __init__(self, config: GenstConfig | None = None, *, feature_key: str = "X_effnet-lite0-imagenet",
                 accelerator: str = "cpu", devices="auto", num_threads: int | None = 1, **overrides):
        self.config = replace(config or GenstConfig(), **overrides)
        self.feature_key = feature_key
        self.trainer_kw = {"accelerator": accelerator, "devices": devices}
        self.num_threads = num_threads

    # -------------------------------------------------------------- inputs
    def _histology(self, adata: ad.AnnData, fit: bool = False, extract: bool = False) -> torch.Tensor:
        """The histology VQ-VAE's inputs: (n, D) features, or (n, 3, px, px) standardised patches."""
        if self.config.histology == "features":
            return self._features(adata, fit, extract)
        cfg = self.config
        u8 = patch_pixels(adata, cfg.patch_um, cfg.patch_px)
        if fit:
            self.features_meta_ = {"size_um": cfg.patch_um, "px": cfg.patch_px}
            self.n_features_ = 3
            self.prep_["feat_mean"], self.prep_["feat_sd"] = channel_stats(u8)
        return scale_pixels(u8, self.prep_["feat_mean"], self.prep_["feat_sd"])

    def _features(self, adata: ad.AnnData, fit: bool = False, extract: bool = False) -> torch.Tensor:
        """(n, D) z-scored, clipped features; checks the encoder and width against the fitted ones."""
        key = self.feature_key
        meta = dict(adata.uns.get(Key.uns.features, {}).get(key, {}) or {})
        if key not in adata.obsm:
            if not (extract and getattr(self, "features_meta_", {}).get("encoder")):
                raise StdistillError(f'no obsm["{key}"]: run stdistill.features.extract(adata, <encoder>) first')
            self._extract(adata)
            meta = dict(adata.uns[Key.uns.features][key])
        F_ = np.asarray(adata.obsm[key], dtype=np.float32)
        if F_.ndim != 2 or len(F_) != adata.n_obs or not np.isfinite(F_).all():
            raise StdistillError(f'obsm["{key}"] must be finite (n_spots, D) features, got {F_.shape}')
        if fit:
            self.features_meta_ = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
            self.features_record_ = jsonable(meta)  # the whole record (stain normalisation too) for the bundle
            self.n_features_ = F_.shape[1]
            self.prep_["feat_mean"], self.prep_["feat_sd"] = _zscore_fit(F_)
        else:
            self._check_features(meta, F_.shape[1])
        c = self.config.feature_clip
        return torch.from_numpy(np.clip((F_ - self.prep_["feat_mean"]) / self.prep_["feat_sd"], -c, c))

    def _check_features(self, meta: dict, width: int) -> None:
        saved = getattr(self, "features_meta_", {})
        for k in ("encoder", "size_um", "px"):
            if k in meta and k in saved and meta[k] != saved[k]:
                raise StdistillError(f'obsm["{self.feature_key}"] holds features with {k}={meta[k]!r}; this GenST model '
                                     f'was trained on {k}={saved[k]!r} ({saved.get("encoder")}): extract features with it')
        if width != self.n_features_:
            raise StdistillError(f'obsm["{self.feature_key}"] has {width} features; this GenST model was trained on '
                                 f'{self.n_features_} ({saved.get("encoder", "unknown encoder")}): same encoder?')

    def _extract(self, adata: ad.AnnData) -> None:
        from ... import features

        m = self.features_meta_
        features.extract(adata, m["encoder"], size_um=m.get("size_um", 112.0), px=m.get("px", 224),
                         precision=m.get("precision", "fp32"), key_added=self.feature_key)

    def _expression(self, adata: ad.AnnData, fit: bool = False, layer: str | None = None) -> dict[str, np.ndarray]:
        """Expression inputs ``x`` (n, G + 1) z-scored, raw ``counts`` (n, G), ``y`` (n, G) log1p counts."""
        C, lib = _counts(adata, self.genes_, layer)
        X = _expr_inputs(C, lib)
        Y = np.log1p(C)
        if fit:
            self.prep_["expr_mean"], self.prep_["expr_sd"] = _zscore_fit(X)
            self.prep_["y_mean"], self.prep_["y_sd"] = _zscore_fit(Y)
        return {"x": (X - self.prep_["expr_mean"]) / self.prep_["expr_sd"], "counts": C, "y": Y}

    def _target(self, e: dict[str, np.ndarray]) -> torch.Tensor:
        if self.config.likelihood == "nb":
            return torch.from_numpy(e["counts"])
        return torch.from_numpy((e["y"] - self.prep_["y_mean"]) / self.prep_["y_sd"])

    # -------------------------------------------------------------- training
    def fit(self, adata: ad.AnnData, genes: Sequence[str] | None = None, *, n_genes: int = 50,
            val: ad.AnnData | None = None, layer: str | None = None, selection: Selection | None = None) -> GenST:
        """Train on ``adata``'s spots (training patients only; raw counts in ``X`` or ``layer``, features
        in ``obsm[feature_key]``).

        ``genes``: the genes to model; ``None``: ``n_genes`` chosen HEST's way on ``adata``'s sections
        (:func:`stdistill.pp.hest_genes`). ``val``: spots of other patients, scored after every
        alignment epoch (mean Pearson of the generated expression) for early stopping and
        :func:`select_genst`; the best epoch is kept. Sets ``curve_`` (validation r, epoch 0 = the
        untrained head) and ``history_`` (losses per epoch). ``selection``: the
        :class:`~stdistill.select.Selection` that chose this config (:func:`select_genst`), kept as
        ``selection_`` and in the saved bundle's training record.
        """
        self.selection_ = selection
        from ...pp.genes import hest_genes

        t0 = time.time()
        # genes first: scanpy's gene selection can reset torch's thread count (numba's OpenMP layer)
        genes = list(genes) if genes is not None else hest_genes(adata, n_genes, sections=None, layer=layer)
        with torch_threads(self.num_threads):
            return self._fit(adata, genes, val, layer, t0)

    def _fit(self, adata, genes, val, layer, t0: float) -> GenST:
        cfg = self.config
        seed_everything(cfg.seed)
        self.genes_ = genes
        if len(set(self.genes_)) != len(self.genes_) or not self.genes_:
            raise StdistillError("genes must be a non-empty list without duplicates")
        if val is not None:
            from ...pp.splits import check_patient_disjoint

            check_patient_disjoint(adata, val)
        self.prep_ = {}
        f = self._histology(adata, fit=True)
        e = self._expression(adata, fit=True, layer=layer)
        self.net_ = GenstNet(len(self.genes_), self.n_features_, cfg)
        hist = self._fit_expression(e)
        vdata = None
        if val is not None:
            vdata = {"f": self._histology(val), "y": torch.from_numpy(self._expression(val, layer=layer)["y"])}
        hist += self._fit_histology(f) + self._fit_alignment(f, e, vdata)
        self.history_ = pd.DataFrame(hist)
        self.seconds_ = time.time() - t0
        self.net_.eval()
        return self

    def _fit_expression(self, e: dict[str, np.ndarray]) -> list[dict]:
        """Stage 1; the decoder's last bias starts at the genes' mean (log counts for ``nb``)."""
        cfg, net = self.config, self.net_
        x = torch.from_numpy(e["x"].astype(np.float32))
        with torch.no_grad():
            last = net.expr.decoder[-1]
            last.bias.copy_(torch.from_numpy(np.log(e["counts"].mean(0) + 1e-2)) if cfg.likelihood == "nb" else 0.0)
            net.eval()
            net.expr(x)  # k-means init of the codebook on all training spots (no EMA update in eval mode)
        mod = ExprVQModule(net, cfg, x, self._target(e))
        _fit_module(mod, len(x), cfg.expr_epochs, cfg, self.trainer_kw)
        net.eval()
        self.table_ = self._code_table()
        return mod.history

    @torch.no_grad()
    def _code_table(self) -> dict[str, np.ndarray]:
        """Per expression code: ``log1p`` (K, G) generated log1p expression and, for ``nb``, ``log_mu`` (K, G)."""
        out = self.net_.expr.code_table().numpy().astype(np.float64)
        if self.config.likelihood == "nb":
            out = np.minimum(out, 20.0)
            return {"log1p": np.log1p(np.exp(out)), "log_mu": out}
        return {"log1p": out * self.prep_["y_sd"] + self.prep_["y_mean"]}

    def _fit_histology(self, f: torch.Tensor) -> list[dict]:
        """The histology VQ-VAE alone for ``hist_epochs`` (none by default); its codebook is
        k-means-initialised on all training spots first."""
        cfg, net = self.config, self.net_
        if cfg.hist_epochs < 1:
            return []
        with torch.no_grad():
            net.eval()
            net.hist(f)
        mod = HistVQModule(net, cfg, f)
        _fit_module(mod, len(f), cfg.hist_epochs, cfg, self.trainer_kw)
        net.eval()
        return mod.history

    def _fit_alignment(self, f: torch.Tensor, e: dict[str, np.ndarray], vdata: dict | None) -> list[dict]:
        """Stage 2 (expression VQ-VAE frozen); the histology codebook is k-means-initialised on all training spots."""
        cfg, net = self.config, self.net_
        with torch.no_grad():
            net.eval()
            out = net.expr(torch.from_numpy(e["x"].astype(np.float32)))
            net.hist(f)
        for p in net.expr.parameters():
            p.requires_grad_(False)
        net.log_theta.requires_grad_(False)
        table = torch.from_numpy(self.table_["log1p"].astype(np.float32))
        self.train_codes_ = out["idx"].numpy()
        mod = AlignModule(net, cfg, {"f": f, "code": out["idx"], "zq": out["zq"]}, table, vdata)
        curve = [generated_pearson(net, vdata["f"], vdata["y"], table)] if vdata else []
        state0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
        _fit_module(mod, len(f), cfg.max_epochs, cfg, self.trainer_kw, val=vdata is not None)
        if mod.best_state is not None:  # keep the best validation epoch (0: the untrained alignment)
            net.load_state_dict(mod.best_state if max(mod.val_scores) > curve[0] else state0)
        self.curve_ = curve + mod.val_scores
        self.best_epoch_ = int(np.argmax(self.curve_)) if self.curve_ else cfg.max_epochs
        rows = mod.history
        if vdata:
            rows = [{"stage": "align", "epoch": 0, "val_r": curve[0]}, *rows]
        return rows

    # -------------------------------------------------------------- generation
    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise StdistillError("GenST is not fitted; call fit() or GenST.load() first")

    @torch.no_grad()
    def _hist_outputs(self, adata: ad.AnnData, extract: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(n_spots, K) expression-code logits and (n_spots,) histology codes, computed in chunks."""
        self._check_fitted()
        cfg = self.config
        if cfg.histology == "pixels":  # standardise chunk by chunk: patches of a whole slide stay uint8
            x, step = patch_pixels(adata, cfg.patch_um, cfg.patch_px), 256
            prep = lambda c: scale_pixels(c, self.prep_["feat_mean"], self.prep_["feat_sd"])  # noqa: E731
        else:
            x, step, prep = self._features(adata, extract=extract), 4096, (lambda c: c)
        self.net_.eval()
        logits, idx = [np.zeros((0, self.net_.expr.codebook_size), np.float32)], [np.zeros(0, np.int64)]
        with torch_threads(self.num_threads):
            for i in range(0, len(x), step):
                lg, h = self.net_.code_logits(prep(x[i:i + step]), decode=False)
                logits.append(lg.numpy())
                idx.append(h["idx"].numpy())
        return np.concatenate(logits).astype(np.float64), np.concatenate(idx)

    def code_logits(self, adata: ad.AnnData, extract: bool = False) -> np.ndarray:
        """(n_spots, K) expression-code logits from the histology (features or patch pixels) alone."""
        return self._hist_outputs(adata, extract)[0]

    def predict(self, adata: ad.AnnData, *, key_added: str | None = Key.obsm.genst_pred, sd_key: str | None = Key.obsm.genst_sd,
                temperature: float | None = None, top_k: int | None = None, extract: bool = False, inplace: bool = True,
                copy: bool = False) -> ad.AnnData | pd.DataFrame | None:
        """Generated expression from H&E features alone (works on tiles with 0 genes).

        The (n_spots x genes) mixture mean ``sum_k p_k log1p(mu_k)`` over the predicted
        expression-code distribution (``temperature``/``top_k``: default the config's), log1p scale,
        goes to ``obsm[key_added]`` and the mixture SD (the spread of code samples) to ``obsm[sd_key]``
        (None: not written), both DataFrames with gene names. Returns None (``copy=True``: a new
        AnnData; ``inplace=False``: the mean, nothing written). ``extract``: compute missing features
        with the encoder the model was trained on.
        """
        cfg = self.config
        P = _tempered(self.code_logits(adata, extract), temperature or cfg.temperature,
                      top_k if top_k is not None else cfg.top_k)
        T = self.table_["log1p"]
        mean = P @ T
        sd = np.sqrt(np.maximum(P @ T ** 2 - mean ** 2, 0.0))
        pred = _frame(mean, adata, self.genes_)

        def write(target: ad.AnnData) -> None:
            target.obsm[key_added] = pred
            if sd_key:
                target.obsm[sd_key] = _frame(sd, adata, self.genes_)

        return deliver(adata, pred, write, copy=copy, inplace=write_or_return(key_added, inplace, "GenST.predict"))

    def sample(self, adata: ad.AnnData, n_samples: int = 32, *, temperature: float | None = None, top_k: int | None = None,
               counts: bool = False, seed: int = 0, key_added: str = Key.obsm.genst_samples,
               sd_key: str | None = Key.obsm.genst_sd, extract: bool = False, inplace: bool = True,
               copy: bool = False) -> ad.AnnData | np.ndarray | None:
        """(n_spots, n_samples, genes) float32 log1p expression drawn from the generative model, seeded,
        into ``obsm[key_added]``; the per-spot, per-gene SD over draws into ``obsm[sd_key]`` (None: not
        written). Returns None (``copy=True``: a new AnnData; ``inplace=False``: the draws, nothing written).

        Each draw picks an expression code from the predicted distribution (``temperature``,
        ``top_k``) and decodes it; ``counts=True`` also draws the counts from the code's negative
        binomial (``likelihood="nb"`` only).

        .. versionchanged:: writes the draws and returns None (it returned them); ``inplace=False`` gives them.
        """
        cfg = self.config
        if n_samples < 1:
            raise StdistillError(f"n_samples must be >= 1, got {n_samples}")
        if counts and cfg.likelihood != "nb":
            raise StdistillError("counts=True needs a negative-binomial model (likelihood='nb')")
        P = _tempered(self.code_logits(adata, extract), temperature or cfg.temperature,
                      top_k if top_k is not None else cfg.top_k)
        rng = np.random.default_rng(seed)
        u = rng.random((len(P), n_samples, 1))
        idx = np.minimum((P.cumsum(1)[:, None, :] < u).sum(-1), P.shape[1] - 1)  # inverse-CDF draws (n, S)
        if counts:
            mu = np.exp(self.table_["log_mu"][idx])
            theta = np.exp(self.net_.log_theta.detach().numpy().astype(np.float64))
            draws = np.log1p(rng.negative_binomial(theta, theta / (theta + mu))).astype(np.float32)
        else:
            draws = self.table_["log1p"][idx].astype(np.float32)

        def write(target: ad.AnnData) -> None:
            target.obsm[key_added] = draws
            if sd_key:
                target.obsm[sd_key] = _frame(draws.std(1), adata, self.genes_)

        return deliver(adata, draws, write, copy=copy, inplace=inplace)

    # -------------------------------------------------------------- interpretation
    @torch.no_grad()
    def expression_codes(self, adata: ad.AnnData, layer: str | None = None) -> np.ndarray:
        """(n_spots,) expression code of each spot (needs its counts of the model's genes)."""
        self._check_fitted()
        x = torch.from_numpy(self._expression(adata, layer=layer)["x"].astype(np.float32))
        self.net_.eval()
        with torch_threads(self.num_threads):
            return self.net_.expr(x)["idx"].numpy()

    def reconstruct(self, adata: ad.AnnData, layer: str | None = None) -> pd.DataFrame:
        """(n_spots x genes) log1p expression after expression VQ-VAE encoding, quantisation and
        decoding: the ceiling of any generation through its codes."""
        return _frame(self.table_["log1p"][self.expression_codes(adata, layer)], adata, self.genes_)

    def predictability(self, adata: ad.AnnData, layer: str | None = None) -> pd.DataFrame:
        """Per gene on ``adata`` (held-out spots with counts): Pearson r of generated vs measured
        log1p counts (``generated``) beside the reconstruction's (``reconstruction``, the ceiling);
        best predicted first."""
        y = np.log1p(_counts(adata, self.genes_, layer)[0])
        gen = self.predict(adata, inplace=False).to_numpy()
        rec = self.reconstruct(adata, layer).to_numpy()
        table = pd.DataFrame({"generated": pearson_per_gene(y, gen, self.genes_),
                              "reconstruction": pearson_per_gene(y, rec, self.genes_)})
        return table.sort_values("generated", ascending=False)

    def codebook_usage(self, adata: ad.AnnData, layer: str | None = None) -> pd.DataFrame:
        """Codebook usage on ``adata`` (rows): ``expression`` (the spots' own codes, needs counts),
        ``histology`` and ``generated`` (argmax of the predicted expression code); columns of
        :func:`codebook_stats` (a collapsed codebook is flagged)."""
        logits, hidx = self._hist_outputs(adata)
        K = self.net_.expr.codebook_size
        rows = {"histology": codebook_stats(hidx, self.net_.hist.codebook_size),
                "generated": codebook_stats(logits.argmax(-1), K)}
        if adata.n_vars:
            rows = {"expression": codebook_stats(self.expression_codes(adata, layer), K), **rows}
        return pd.DataFrame.from_dict(rows, orient="index")

    # -------------------------------------------------------------- persistence (a bundle; see stdistill.bundle)
    _bundle_format = _FORMAT

    def _bundle_parts(self) -> tuple[dict, dict, dict]:
        """(config, tensors, record): nets and codebooks, the scaling arrays, settings and genes."""
        from ...bundle import bundle_record

        self._check_fitted()
        tensors = dict(self.net_.state_dict())
        tensors.update({f"_prep.{k}": np.ascontiguousarray(self.prep_[k]) for k in _PREP})
        meta = {"config": asdict(self.config), "genes": self.genes_, "feature_key": self.feature_key,
                "n_features": self.n_features_, "features": self.features_meta_,
                "curve": [float(x) for x in getattr(self, "curve_", [])]}
        if self.config.histology == "pixels":  # the model reads patch pixels, not an encoder's features
            feats, norm = {"pixels": True, **self.features_meta_}, "RGB / 255 z-scored per channel (training patches)"
        else:
            feats, norm = getattr(self, "features_record_", None) or self.features_meta_, "z-score (training mean/sd), clipped"
        rec = bundle_record("genst", features=feats, feature_norm=norm, outputs={"genes": self.genes_},
                            training={"curve": meta["curve"], **selection_record(getattr(self, "selection_", None))})
        return meta, tensors, rec

    @classmethod
    def _from_bundle(cls, meta, tensors, record, path, *, accelerator: str = "cpu", devices="auto",
                     num_threads: int | None = 1, **_) -> GenST:
        cfg = GenstConfig(**meta["config"])
        self = cls(cfg, feature_key=meta["feature_key"], accelerator=accelerator, devices=devices, num_threads=num_threads)
        self.genes_, self.n_features_ = list(meta["genes"]), int(meta["n_features"])
        self.features_meta_, self.features_record_ = dict(meta["features"] or {}), record.get("features")
        self.prep_ = {k: tensors.pop(f"_prep.{k}").numpy() for k in _PREP}
        net = GenstNet(len(self.genes_), self.n_features_, cfg)
        load_state(net, tensors, path, "GenST model")
        self.net_ = net.eval()
        self.curve_ = list(meta["curve"])
        sel = record.get("training", {}).get("selection")
        self.selection_ = Selection.from_dict(sel) if sel else None
        self.table_ = self._code_table()
        return self
