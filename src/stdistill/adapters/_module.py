"""The shared training loop of an adapted encoder tail with heads (module level, so it pickles).

A recipe subclasses :class:`TailModule` and writes only its science: :meth:`TailModule.loss_terms`
(named loss terms of one batch) and the weights it gives them. Batching over cached trunk
activations, the validation curve (epoch 0 = the frozen encoder with ridge-initialised heads),
best-epoch tracking and the optimiser are shared. The net's ``forward(h)`` returns a dict with at
least ``"features"`` (B, dim) and ``"pred"`` (B, n_targets) z-scored regression targets.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn

from ._config import AdapterConfig
from ._peft import is_adapter_key


class AdaptedNet(nn.Module):
    """The adapted tail, feature standardisation buffers (``feat_mu``, ``feat_sd``: set from the
    frozen features) and a linear regression head ``reg`` (dim -> n_targets); recipes add heads."""

    def __init__(self, tail: nn.Module, dim: int, n_targets: int):
        super().__init__()
        self.tail = tail
        self.register_buffer("feat_mu", torch.zeros(dim))
        self.register_buffer("feat_sd", torch.ones(dim))
        self.reg = nn.Linear(dim, n_targets)

    def standardised(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, dim), standardised features (B, dim)) of trunk activations ``h``."""
        f = self.tail(h)
        return f, (f - self.feat_mu) / self.feat_sd


def ridge_init(lin: nn.Linear, X: torch.Tensor, Y: torch.Tensor, lam_frac: float = 0.1) -> None:
    """Set a linear head to the ridge solution on (standardised) X -> Y (with intercept), penalty ``lam_frac x n``."""
    X = X.double()
    Y = Y.double()
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    lam = lam_frac * len(X)
    A = Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=X.dtype)
    W = torch.linalg.solve(A, Xc.T @ Yc)
    with torch.no_grad():
        lin.weight.copy_(W.T.float())
        lin.bias.copy_((my - mx @ W).float())


def mean_pearson(Y: np.ndarray, P: np.ndarray) -> float:
    """Mean over columns of the Pearson r between (n, k) targets and predictions (NaN columns skipped)."""
    from ..metrics import pearson_per_gene

    return float(np.nanmean(pearson_per_gene(Y, P).to_numpy()))


_VAL_KEYS = {"ridge": "val_ridge_pearson", "head": "val_head_pearson", "mse": "val_mse"}


def val_curve(history: list[dict], val_metric: str) -> list[float]:
    """The validation score ``val_metric`` after each epoch of a :class:`TailModule` history (epoch 0 first)."""
    return [h[_VAL_KEYS[val_metric]] for h in history]


def trainable_key(key: str, heads: tuple[str, ...]) -> bool:
    """State-dict keys that training changes: adapter weights and the heads (prefixes ``heads``)."""
    return is_adapter_key(key) or key.startswith(heads)


class TailModule(L.LightningModule):
    """Trains ``net`` on batches of spot indices into ``data`` (``"h"``: trunk activations (n, views, ...),
    ``"y"``: z-scored targets (n, k), plus whatever :meth:`loss_terms` reads).

    ``history`` gets one dict per epoch (``epoch``, ``train_<term>``, ``val_mse``,
    ``val_head_pearson``, ``val_ridge_pearson``); the best validation epoch's trainable state is in
    ``best_state``. ``loader_generator``: the training DataLoader's shuffling generator; it is
    checkpointed with these and the RNG states, so a run resumed from a checkpoint
    (:mod:`stdistill._resume`) draws the same batches and views as an uninterrupted one.
    """

    heads: tuple[str, ...] = ()  # state-dict prefixes of the trainable heads

    def __init__(self, net: nn.Module, data: dict, cfg: AdapterConfig, val: dict | None = None, *,
                 loader_generator: torch.Generator | None = None):
        super().__init__()
        self.net, self.data, self.cfg, self.val_data = net, data, cfg, val
        self.loader_generator = loader_generator
        self.history: list[dict] = []
        self.best_score = float("inf")
        self.best_state = None
        self.best_epoch = -1
        self._restored_gen = None  # the view generator's state read from a checkpoint

    # -------------------------------------------------------------- the recipe's science
    def loss_terms(self, out: dict, idx: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        """``{name: (weight, value)}`` for one batch; terms with weight 0 are left out by the caller."""
        raise NotImplementedError

    # -------------------------------------------------------------- shared engineering
    def target(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        return self.data[key][idx.cpu()].to(self.device)

    def _batch(self, idx: torch.Tensor, part: dict, train: bool) -> torch.Tensor:
        h = part["h"][idx.cpu()]
        if train and h.shape[1] > 1:
            v = torch.randint(h.shape[1], (len(idx),), generator=self._gen)
            h = h[torch.arange(len(idx)), v]
        else:
            h = h[:, 0]
        if train and self.cfg.train_positions and h.dtype != torch.uint8 and h.ndim == 4:
            # the tail after the default cut is pointwise + average pooling: a random subset of
            # map positions is a cheaper, noisier view of the same patch (a crop-like augmentation)
            k = min(self.cfg.train_positions, h.shape[2] * h.shape[3])
            sel = torch.randperm(h.shape[2] * h.shape[3], generator=self._gen)[:k]
            h = h.flatten(2)[:, :, sel].unsqueeze(-1)
        return h.to(self.device).float() if h.dtype != torch.uint8 else h.to(self.device)

    def _snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items() if trainable_key(k, self.heads)}

    def on_fit_start(self):
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        if self._restored_gen is not None:  # resumed: the history and best state came from the checkpoint
            self._gen.set_state(self._restored_gen)
            return
        if self.val_data is not None:  # epoch 0 = the frozen encoder with ridge-initialised heads
            rec = {"epoch": 0}
            self.net.eval()
            self.best_score = self._val_score(rec)
            self.net.train()
            self.best_epoch = -1
            self.best_state = self._snapshot()
            self.history.append(rec)

    def on_train_epoch_start(self):
        self._sums = {}

    def training_step(self, batch, _):
        (idx,) = batch
        out = self.net(self._batch(idx, self.data, True))
        loss = torch.zeros((), device=self.device)
        parts = {}
        for name, (w, value) in self.loss_terms(out, idx).items():
            if w:
                parts[name] = value
                loss = loss + w * value
        parts["loss"] = loss
        for k, v in parts.items():
            s, c = self._sums.get(k, (0.0, 0))
            self._sums[k] = (s + float(v.detach()) * len(idx), c + len(idx))
        return loss

    @torch.no_grad()
    def outputs(self, part: dict, keys: tuple[str, ...] = ("features", "pred")) -> list[np.ndarray]:
        """The net's outputs ``keys`` over all spots of ``part`` (eval batches of 256, first view)."""
        got = {k: [] for k in keys}
        n = len(part["h"])
        for i in range(0, n, 256):
            out = self.net(self._batch(torch.arange(i, min(n, i + 256)), part, False))
            for k in keys:
                got[k].append(out[k].float().cpu())
        return [torch.cat(got[k]).numpy() for k in keys]

    def _synced_sums(self) -> dict[str, tuple[float, int]]:
        """The epoch's loss sums and spot counts, summed over DDP processes (each saw its own shard)."""
        if self.trainer.world_size <= 1 or not self._sums:
            return self._sums
        keys = sorted(self._sums)
        t = torch.tensor([[self._sums[k][0], self._sums[k][1]] for k in keys], dtype=torch.float64, device=self.device)
        t = self.trainer.strategy.reduce(t, reduce_op="sum").cpu()
        return {k: (float(t[i, 0]), int(t[i, 1])) for i, k in enumerate(keys)}

    def on_train_epoch_end(self):
        rec = {"epoch": self.current_epoch + 1}
        rec.update({f"train_{k}": s / max(c, 1) for k, (s, c) in self._synced_sums().items()})
        if self.val_data is not None:
            # every DDP process scores the whole validation set with the same (synchronised) weights;
            # the mean over processes (sync_dist) makes early stopping and the best epoch one decision
            self.net.eval()
            score = self._val_score(rec)
            self.net.train()
            if self.trainer.world_size > 1:
                score = float(self.trainer.strategy.reduce(torch.tensor(score, device=self.device), reduce_op="mean"))
            self.log("val_score", score, prog_bar=False, sync_dist=True)
            if score < self.best_score:
                self.best_score, self.best_epoch = score, self.current_epoch
                self.best_state = self._snapshot()
        self.history.append(rec)

    def _val_score(self, rec: dict) -> float:
        """Fill ``rec`` with the validation scores; return the one to minimise."""
        fv, pv = self.outputs(self.val_data)
        yv = self.val_data["y"].numpy()
        rec["val_mse"] = float(np.mean((pv - yv) ** 2))
        rec["val_head_pearson"] = mean_pearson(yv, pv)
        if self.cfg.val_metric == "ridge":
            from ..bench import HestRidge

            ft, _ = self.outputs(self.data)
            probe = HestRidge(latent_dim=256, seed=1, svd_solver="covariance_eigh").fit(ft, self.data["y"].numpy())
            rec["val_ridge_pearson"] = mean_pearson(yv, probe.predict(fv))
            return -rec["val_ridge_pearson"]
        if self.cfg.val_metric == "head":
            return -rec["val_head_pearson"]
        return rec["val_mse"]

    # -------------------------------------------------------------- checkpoints (resume)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """History, best epoch and weights, RNG states (plain values and tensors: loadable with weights_only)."""
        checkpoint["stdistill"] = {
            "history": [dict(h) for h in self.history], "best_score": float(self.best_score),
            "best_epoch": int(self.best_epoch), "best_state": self.best_state,
            "torch_rng": torch.get_rng_state(),
            "view_rng": self._gen.get_state() if hasattr(self, "_gen") else None,
            "loader_rng": None if self.loader_generator is None else self.loader_generator.get_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        s = checkpoint.get("stdistill", {})
        self.history = [dict(h) for h in s.get("history", [])]
        self.best_score, self.best_epoch = float(s.get("best_score", float("inf"))), int(s.get("best_epoch", -1))
        self.best_state = s.get("best_state")
        self._restored_gen = s.get("view_rng")
        if s.get("torch_rng") is not None:
            torch.set_rng_state(s["torch_rng"])
        if s.get("loader_rng") is not None and self.loader_generator is not None:
            self.loader_generator.set_state(s["loader_rng"])

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
