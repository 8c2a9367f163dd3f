"""GenST's LightningModules: stage 1 (:class:`ExprVQModule`) and stage 2 (:class:`AlignModule`), and
the loop that trains either (:func:`_fit_module`)."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from ...metrics import pearson_per_gene
from ._config import GenstConfig
from ._nets import GenstNet, nb_nll
from ._pixels import augment_pixels

__all__ = ["AlignModule", "ExprVQModule", "HistVQModule", "generated_pearson"]


def _epoch_means(acc: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in acc.items() if v}


class ExprVQModule(L.LightningModule):
    """Stage 1: the expression VQ-VAE on (n, G + 1) inputs ``x`` and (n, G) targets ``y`` (raw
    counts for ``nb``, z-scored log1p for ``mse``). Batches are (B,) row indices."""

    def __init__(self, net: GenstNet, cfg: GenstConfig, x: torch.Tensor, y: torch.Tensor):
        super().__init__()
        self.net, self.cfg = net, cfg
        self.register_buffer("x", x, persistent=False)
        self.register_buffer("y", y, persistent=False)
        self.history: list[dict] = []
        self._acc: dict[str, list[float]] = {"rec": [], "vq": []}

    def on_fit_start(self):
        self.net.train()  # Lightning keeps the mode a module arrives in

    def training_step(self, batch, _):
        i = batch[0]
        out = self.net.expr(self.x[i])
        if self.cfg.likelihood == "nb":
            rec = nb_nll(self.y[i], out["out"].clamp(max=20.0), self.net.log_theta)
        else:
            rec = F.mse_loss(out["out"], self.y[i])
        self._acc["rec"].append(float(rec.detach()))
        self._acc["vq"].append(float(out["vq_loss"].detach()))
        return rec + out["vq_loss"]

    def on_train_epoch_end(self):
        self.history.append({"stage": "expr", "epoch": self.current_epoch + 1, **_epoch_means(self._acc)})
        self._acc = {k: [] for k in self._acc}

    def configure_optimizers(self):
        params = [*self.net.expr.parameters(), self.net.log_theta]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


class _HistInput:
    """Training inputs of the histology VQ-VAE: patches are augmented (``cfg.augment``), seeded by ``cfg.seed``."""

    def _setup_aug(self, cfg: GenstConfig) -> None:
        self.aug = cfg.histology == "pixels" and cfg.augment
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def hist_input(self, f: torch.Tensor) -> torch.Tensor:
        return augment_pixels(f, self.gen) if self.aug else f


class HistVQModule(_HistInput, L.LightningModule):
    """Histology VQ-VAE alone (``cfg.hist_epochs`` before the alignment): reconstruction (MSE) +
    commitment on ``f`` (n, D) features or (n, 3, px, px) patches. Batches are (B,) row indices."""

    def __init__(self, net: GenstNet, cfg: GenstConfig, f: torch.Tensor):
        super().__init__()
        self.net, self.cfg = net, cfg
        self.register_buffer("f", f, persistent=False)
        self._setup_aug(cfg)
        self.history: list[dict] = []
        self._acc: dict[str, list[float]] = {"rec_h": [], "vq_h": []}

    def on_fit_start(self):
        self.net.train()
        self.net.expr.eval()

    def training_step(self, batch, _):
        x = self.hist_input(self.f[batch[0]])
        h = self.net.hist(x)
        rec = F.mse_loss(h["out"], x)
        self._acc["rec_h"].append(float(rec.detach()))
        self._acc["vq_h"].append(float(h["vq_loss"].detach()))
        return self.cfg.w_rec * rec + h["vq_loss"]

    def on_train_epoch_end(self):
        self.history.append({"stage": "hist", "epoch": self.current_epoch + 1, **_epoch_means(self._acc)})
        self._acc = {k: [] for k in self._acc}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.hist.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


class AlignModule(_HistInput, L.LightningModule):
    """Stage 2: histology VQ-VAE + cross-modal head + contrastive projections, with the expression
    VQ-VAE frozen. Training data: ``f`` (n, D) features, ``code`` (n,) expression codes, ``zq`` (n,
    latent) quantised expression latents. Validation (optional): ``val_f`` (m, D) and ``val_y`` (m, G)
    log1p targets scored by the mean Pearson of the generated expression (``table``: (K, G) log1p
    output per code); the best epoch's weights are kept."""

    _trained = ("hist", "head", "proj_h", "proj_e", "logit_scale")

    def __init__(self, net: GenstNet, cfg: GenstConfig, data: dict[str, torch.Tensor], table: torch.Tensor,
                 val: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.net, self.cfg = net, cfg
        for k, v in {**data, **{f"val_{k}": v for k, v in (val or {}).items()}, "table": table}.items():
            self.register_buffer(k, v, persistent=False)
        self.has_val = val is not None
        self._setup_aug(cfg)
        self.history: list[dict] = []
        self.val_scores: list[float] = []
        self.best_state: dict | None = None
        self._acc: dict[str, list[float]] = {"rec_h": [], "vq_h": [], "ce": [], "con": []}

    def on_fit_start(self):
        self.net.train()
        self.net.expr.eval()  # frozen

    def training_step(self, batch, _):
        from ...losses import info_nce

        i, cfg = batch[0], self.cfg
        x = self.hist_input(self.f[i])
        logits, h = self.net.code_logits(x)
        terms = {"rec_h": F.mse_loss(h["out"], x), "vq_h": h["vq_loss"], "ce": F.cross_entropy(logits, self.code[i])}
        if cfg.w_con > 0 and len(i) > 1:
            terms["con"] = info_nce(self.net.proj_h(h["zq"]), self.net.proj_e(self.zq[i]), self.net.logit_scale)
        for k, v in terms.items():
            self._acc[k].append(float(v.detach()))
        w = {"rec_h": cfg.w_rec, "vq_h": 1.0, "ce": cfg.w_ce, "con": cfg.w_con}
        return sum(w[k] * v for k, v in terms.items())

    def validation_step(self, batch, _):
        r = generated_pearson(self.net, self.val_f, self.val_y, self.table)
        self.log("val_loss", -r if np.isfinite(r) else 1.0, on_epoch=True, batch_size=len(self.val_f))
        if not self.trainer.sanity_checking:
            if not self.val_scores or r > max(self.val_scores):
                self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            self.val_scores.append(r)

    def on_train_epoch_end(self):
        row = {"stage": "align", "epoch": self.current_epoch + 1, **_epoch_means(self._acc)}
        if self.val_scores and len(self.val_scores) == self.current_epoch + 1:
            row["val_r"] = self.val_scores[-1]
        self.history.append(row)
        self._acc = {k: [] for k in self._acc}

    def configure_optimizers(self):
        params = [p for n, p in self.net.named_parameters() if n.split(".")[0] in self._trained]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


@torch.no_grad()
def generated_pearson(net: GenstNet, f: torch.Tensor, y: torch.Tensor, table: torch.Tensor) -> float:
    """Mean over genes of the Pearson r between measured (m, G) ``y`` and the mixture-mean generation."""
    was = net.training
    net.eval()
    pred = torch.softmax(net.code_logits(f, decode=False)[0], -1) @ table
    net.train(was)
    r = pearson_per_gene(y.cpu().numpy(), pred.cpu().numpy()).to_numpy()
    return float(np.nanmean(r)) if np.isfinite(r).any() else 0.0


def _fit_module(module: L.LightningModule, n: int, epochs: int, cfg: GenstConfig, trainer_kw: dict,
                val: bool = False) -> None:
    """Train ``module`` on row indices 0..n-1 (seeded shuffle) for ``epochs`` (early stopping on
    ``val_loss`` with ``cfg.patience`` when ``val``)."""
    from torch.utils.data import DataLoader, TensorDataset

    from ..._lightning import make_trainer, quiet

    if epochs < 1:
        return
    g = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, n)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=bs, shuffle=True, generator=g,
                        drop_last=n > bs and n % bs == 1)  # a last batch of one spot has no InfoNCE negatives
    vloader = DataLoader(TensorDataset(torch.zeros(1)), batch_size=1) if val else None
    with quiet(), warnings.catch_warnings():
        trainer = make_trainer(max_epochs=epochs, monitor="val_loss" if val else None, patience=cfg.patience,
                               num_sanity_val_steps=0, enable_progress_bar=False, **trainer_kw)
        trainer.fit(module, loader, vloader)
