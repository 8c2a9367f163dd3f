"""The niche student's LightningModule, at module level (picklable, checkpointable); its network is in
:mod:`._niche_net` (importable without Lightning, for prediction)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn

from ..losses import distillation_loss
from ._niche_net import NicheTransformer  # noqa: F401 - re-exported


#: Python-side training state kept in every checkpoint (so a resumed run ends where an
#: uninterrupted one would).
_HISTORIES = ("val_history", "val_err_history", "monitor_history", "val_ari_history")


class NicheDistill(L.LightningModule):
    """Distil the teacher's soft labels ``probs`` (n, K) into ``net`` on neighbourhood tokens.

    ``index`` (n, T) spot rows of each token (-1 padding), ``offset`` (n, T, 2) offsets / radius,
    ``mask`` (n, T) real tokens; training augments by token dropout and random rotation/flip.
    ``monitor``: "val_ari" (negated), "val_err" or "val_loss"; ``best_state`` holds the net's
    weights at the best epoch. ``loader_generator``: the training DataLoader's shuffling
    generator, whose state is checkpointed with the torch RNG, so a resumed run draws the same
    batches and augmentations as an uninterrupted one.
    """

    def __init__(self, net: nn.Module, feats, index, offset, mask, probs, *, temperature: float, hard_weight: float,
                 lr: float, weight_decay: float, token_drop: float, monitor: str = "val_ari",
                 loader_generator: torch.Generator | None = None):
        super().__init__()
        self.net = net
        for name, arr in (("feats", feats), ("index", index), ("offset", offset), ("mask", mask), ("probs", probs)):
            self.register_buffer(name, torch.from_numpy(arr), persistent=False)
        self.temperature, self.hard_weight, self.lr, self.weight_decay = temperature, hard_weight, lr, weight_decay
        self.token_drop, self.monitor = token_drop, monitor
        self.loader_generator = loader_generator
        self.val_history: list[float] = []
        self.val_err_history: list[float] = []
        self.monitor_history: list[float] = []
        self.val_ari_history: list[float] = []
        self.best_state: dict | None = None
        self._reset_val()

    def _reset_val(self) -> None:
        self._val_sum, self._val_n, self._val_hit = 0.0, 0, 0.0
        self._val_pred: list = []
        self._val_true: list = []

    def _batch(self, i, train: bool):
        idx = self.index[i]
        m = self.mask[i].clone()
        off = self.offset[i]
        if train:
            if self.token_drop > 0:
                keep = torch.rand(m.shape, device=m.device) >= self.token_drop
                keep[:, 0] = True
                m = m & keep
            th = torch.rand(len(i), device=off.device) * 2 * torch.pi
            c, s = th.cos(), th.sin()
            flip = torch.where(torch.rand(len(i), device=off.device) < 0.5, -1.0, 1.0)
            rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s * flip, c * flip], -1)], -2)
            off = torch.einsum("bij,btj->bti", rot, off)
        x = self.feats[idx.clamp_min(0)] * m.unsqueeze(-1)
        return self.net(x, off, m), self.probs[i]

    def training_step(self, batch, _):
        logits, p = self._batch(batch[0], train=True)
        loss = distillation_loss(logits, p, self.temperature, self.hard_weight)
        self.log("train_loss", loss, prog_bar=False, batch_size=len(p))
        return loss

    def validation_step(self, batch, _):
        logits, p = self._batch(batch[0], train=False)
        loss = distillation_loss(logits, p, self.temperature, self.hard_weight)
        self._val_sum += float(loss) * len(p)
        self._val_n += len(p)
        self._val_hit += float((logits.argmax(-1) == p.argmax(-1)).sum())
        self._val_pred.append(logits.argmax(-1).cpu().numpy())
        self._val_true.append(p.argmax(-1).cpu().numpy())
        self.log("val_loss", loss, prog_bar=False, batch_size=len(p), on_epoch=True, on_step=False)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self._reset_val()
            return
        from ..metrics import ari

        sums = (self._val_sum, self._val_n, self._val_hit)
        true, pred = np.concatenate(self._val_true), np.concatenate(self._val_pred)
        if self.trainer.world_size > 1:  # DDP: every rank scores the whole validation set
            parts = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, (sums, true, pred))
            sums = tuple(sum(q[0][j] for q in parts) for j in range(3))
            true, pred = np.concatenate([q[1] for q in parts]), np.concatenate([q[2] for q in parts])
        v = sums[0] / max(sums[1], 1)
        err = 1.0 - sums[2] / max(sums[1], 1)
        r = float(ari(true, pred))
        self._reset_val()
        self.val_history.append(float(v))
        self.val_err_history.append(float(err))
        self.val_ari_history.append(r)
        # error ties (coarse on small validation sets) are broken by the loss
        score = float({"val_err": err + 1e-4 * v / (1.0 + v), "val_loss": v, "val_ari": -r}[self.monitor])
        self.log("val_err", score if self.monitor == "val_err" else err, prog_bar=False)
        self.log("val_ari", -r, prog_bar=False)  # negated: early stopping minimises
        if not self.monitor_history or score < min(self.monitor_history):
            self.best_state = {k: t.detach().clone() for k, t in self.net.state_dict().items()}
        self.monitor_history.append(score)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ checkpoints (resume)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Histories, best weights and RNG states (plain lists and tensors: loadable with weights_only)."""
        checkpoint["stdistill"] = {
            **{k: list(getattr(self, k)) for k in _HISTORIES},
            "best_state": self.best_state,
            "torch_rng": torch.get_rng_state(),
            "loader_rng": None if self.loader_generator is None else self.loader_generator.get_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        s = checkpoint.get("stdistill", {})
        for k in _HISTORIES:
            setattr(self, k, [float(v) for v in s.get(k, [])])
        self.best_state = s.get("best_state")
        if s.get("torch_rng") is not None:
            torch.set_rng_state(s["torch_rng"])
        if s.get("loader_rng") is not None and self.loader_generator is not None:
            self.loader_generator.set_state(s["loader_rng"])
