"""The niche student's training: its network and LightningModule (at module level: picklable,
checkpointable) and one Lightning run with checkpoints and resume (:func:`train_net`)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from ..._threads import torch_threads
from ..._utils import seed_everything
from ...losses import distillation_loss
from ._config import ENGINEERING, NicheStudentConfig

__all__ = ["NicheDistill", "NicheTransformer", "make_net", "train_net"]


class NicheTransformer(nn.Module):
    """(B, T, F) features, (B, T, 2) offsets / radius, (B, T) mask -> (B, K) logits.

    Token 0 is the centre spot. With ``summary_token`` a neighbourhood token (the mean of the
    real tokens' features, with its own learned embedding) is added; the head reads the
    centre's and the summary's outputs.
    """

    def __init__(self, d_feat: int, n_niches: int, d_model: int, n_layers: int, n_heads: int, dropout: float,
                 summary_token: bool = True):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(d_feat), nn.Dropout(dropout), nn.Linear(d_feat, d_model))
        self.pos = nn.Sequential(nn.Linear(2, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.centre = nn.Parameter(torch.zeros(d_model))
        self.summary = nn.Parameter(torch.zeros(d_model)) if summary_token else None
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        n_out = 2 if summary_token else 1
        self.head = nn.Sequential(nn.LayerNorm(n_out * d_model), nn.Linear(n_out * d_model, n_niches))

    def forward(self, x, off, mask):
        h = self.inp(x) + self.pos(off)
        h[:, 0] = h[:, 0] + self.centre
        if self.summary is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            mean = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
            hs = (self.inp(mean) + self.summary).unsqueeze(1)
            h = torch.cat([h[:, :1], hs, h[:, 1:]], 1)
            mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]), mask[:, 1:]], 1)
        h = self.encoder(h, src_key_padding_mask=~mask)
        return self.head(h[:, :2].flatten(1) if self.summary is not None else h[:, 0])


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
        from ...metrics import ari

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


def make_net(cfg: NicheStudentConfig, d_in: int) -> NicheTransformer:
    """The untrained network of ``cfg`` for ``d_in`` input features."""
    return NicheTransformer(d_in, cfg.n_niches, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.dropout, cfg.summary_token)


def _stage_dir(run_dir: str | os.PathLike, stage: str, cfg: NicheStudentConfig, seed: int, epochs: int, arrays,
               *idx) -> Path:
    """The checkpoint folder of one training stage (:func:`stdistill._resume.stage_dir`): the
    fingerprint covers the settings (not the engineering ones), seed, epochs, inputs and the
    training/validation rows."""
    from ..._resume import stage_dir

    keep = {k: v for k, v in cfg.as_dict().items() if k not in ENGINEERING}
    return stage_dir(run_dir, stage, [keep, seed, epochs], (*arrays[:5], *idx))


def _loaders(train_idx: np.ndarray, val_idx: np.ndarray | None, batch_size: int, world: int, g: torch.Generator):
    """Shuffled training batches (``batch_size / world`` rows per process) and validation batches."""
    from torch.utils.data import DataLoader, TensorDataset

    bs = min(-(-batch_size // world), len(train_idx))
    tr = DataLoader(TensorDataset(torch.from_numpy(train_idx)), batch_size=bs, shuffle=True, generator=g,
                    drop_last=len(train_idx) > bs and len(train_idx) % bs == 1)
    va = None if val_idx is None else DataLoader(TensorDataset(torch.from_numpy(val_idx)), batch_size=1024)
    return tr, va


def train_net(cfg: NicheStudentConfig, arrays, train_idx: np.ndarray, val_idx: np.ndarray | None, epochs: int,
              seed: int, *, run_opts: dict, views: np.ndarray | None = None, run_dir: str | os.PathLike | None = None,
              stage: str = "fit", resumed: list | None = None) -> NicheDistill:
    """Train one net on ``arrays`` (features, token index, offsets, mask, soft labels, rows; from
    ``NicheData._prepare``) rows ``train_idx``, early stopping on ``val_idx`` (None: ``epochs``).

    ``run_opts``: Lightning's ``accelerator``, ``devices``, ``strategy``, ``num_nodes``. ``views``:
    (n, V, d) augmented views drawn each epoch. With ``run_dir``, checkpoint every epoch and resume
    from the last one; a stage that finished is read back from ``done.ckpt`` (its name is added to
    ``resumed``). Returns the LightningModule (histories, ``best_state``).
    """
    from ..._lightning import make_trainer, quiet

    f, index, offset, mask, probs, _ = arrays
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    mod = NicheDistill(make_net(cfg, f.shape[1]), f, index, offset, mask, probs, temperature=cfg.temperature,
                       hard_weight=cfg.hard_weight, lr=cfg.lr, weight_decay=cfg.weight_decay, token_drop=cfg.token_drop,
                       monitor=cfg.monitor, loader_generator=g)
    ro = run_opts
    tr, va = _loaders(train_idx, val_idx, cfg.batch_size,
                      (ro["devices"] if isinstance(ro["devices"], int) else 1) * ro["num_nodes"], g)
    ckpt_dir, callbacks, resume = None, [], None
    if views is not None:
        from .._views import ViewSampler

        callbacks.append(ViewSampler(f, views, seed))
    if run_dir is not None:
        from ..._resume import checkpoint_callback, last_ckpt, read_done

        ckpt_dir = _stage_dir(run_dir, stage, cfg, seed, epochs, arrays, train_idx, val_idx)
        if read_done(mod, ckpt_dir):
            (resumed if resumed is not None else []).append(f"{stage} (finished)")
            return mod
        callbacks.append(checkpoint_callback(ckpt_dir))
        resume = last_ckpt(ckpt_dir)
        if resume is not None and resumed is not None:
            resumed.append(stage)
    trainer = make_trainer(max_epochs=epochs, monitor=cfg.monitor if va is not None else None,
                           patience=cfg.patience, accelerator=ro["accelerator"], devices=ro["devices"],
                           strategy=ro["strategy"], num_nodes=ro["num_nodes"],
                           num_sanity_val_steps=0, enable_progress_bar=False, callbacks=callbacks,
                           epoch_bar=f"niche student ({stage}): epochs",
                           enable_checkpointing=ckpt_dir is not None)
    with torch_threads(cfg.num_threads), quiet():
        trainer.fit(mod, tr, va, ckpt_path=resume, weights_only=True)
    if ckpt_dir is not None:
        from ..._resume import save_done

        save_done(trainer, ckpt_dir)
    return mod
