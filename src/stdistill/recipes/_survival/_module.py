"""Batches of bags and the LightningModule that trains every survival net (teacher or student).

Kept at module level so Lightning can pickle them (``ddp_spawn``) and rebuild them by import path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import nn

from ._losses import (
    cox_loss,
    discrepancy_weights,
    feature_kd,
    logit_kd,
    nll_loss,
    nll_risk,
    redundancy_reduction,
    whitened_redundancy,
)


@dataclass
class Arrays:
    """What a net needs of P patients, aligned: ``bags`` P tensors (n_i, d); ``genes`` (P, G) and
    ``clin`` (P, C) standardised or None; ``y`` (P,) time bin, ``event`` (P,), ``time`` (P,);
    ``has_rna`` (P,) bool or None (all): patients whose ``genes`` row is a real profile (the
    others hold zeros and never reach the teacher)."""

    bags: list[torch.Tensor]
    genes: torch.Tensor | None
    clin: torch.Tensor | None
    y: torch.Tensor
    event: torch.Tensor
    time: torch.Tensor
    has_rna: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.bags)


class Collate:
    """Builds a padded batch from patient indices: ``bag`` (B, N, d), ``mask`` (B, N) bool, ``genes``,
    ``clin``, ``y``, ``event``, ``time``, ``has_rna`` (B,) bool or None. In training, bags above ``max_instances`` are subsampled
    at random (torch's global generator, seeded per run)."""

    def __init__(self, arrays: Arrays, max_instances: int | None = None, train: bool = False):
        self.a, self.max_instances, self.train = arrays, max_instances, train

    def __call__(self, idx: list) -> dict[str, torch.Tensor | None]:
        idx = [int(i) for i in idx]
        bags = []
        for i in idx:
            b = self.a.bags[i]
            if self.train and self.max_instances and len(b) > self.max_instances:
                b = b[torch.randperm(len(b))[: self.max_instances]]
            bags.append(b)
        n = max(len(b) for b in bags)
        bag = torch.zeros(len(bags), n, bags[0].shape[1])
        mask = torch.zeros(len(bags), n, dtype=torch.bool)
        for j, b in enumerate(bags):
            bag[j, : len(b)] = b
            mask[j, : len(b)] = True
        t = torch.as_tensor(idx)
        pick = (lambda x: None if x is None else x[t])  # noqa: E731
        return {"bag": bag, "mask": mask, "genes": pick(self.a.genes), "clin": pick(self.a.clin),
                "y": self.a.y[t], "event": self.a.event[t], "time": self.a.time[t], "has_rna": pick(self.a.has_rna)}


def run_net(net: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    return net(batch["bag"], batch["mask"], batch["genes"], batch["clin"])


def risk_of(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """(B,) risk (higher = earlier event) from (B, K) NLL logits or (B, 1) Cox log-hazards."""
    return logits.view(-1) if loss == "cox" else nll_risk(logits)


def _length_batches(lengths: list[int], batch_size: int, max_cells: int) -> list[list[int]]:
    """Indices grouped by bag length (sorted), at most ``batch_size`` bags and ``max_cells`` padded
    instances per batch (a whole-slide bag of tens of thousands of tiles goes alone)."""
    out, cur = [], []
    for i in np.argsort(lengths, kind="stable").tolist():
        if cur and (len(cur) == batch_size or (len(cur) + 1) * lengths[i] > max_cells):
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


@torch.no_grad()
def predict_arrays(net: nn.Module, arrays: Arrays, loss: str, batch_size: int = 8,
                   max_cells: int = 65536) -> dict[str, np.ndarray]:
    """``risk`` (P,), ``logits`` (P, K), ``emb`` (P, D) and ``attn`` (list of (n_i,) or None) with the
    full bags (no subsampling), in eval mode; batches are formed by bag length to limit padding."""
    was = net.training
    net.eval()
    col = Collate(arrays)
    logits, emb, attn = [None] * len(arrays), [None] * len(arrays), [None] * len(arrays)
    for idx in _length_batches([len(b) for b in arrays.bags], batch_size, max_cells):
        batch = col(idx)
        out = run_net(net, batch)
        for j, i in enumerate(idx):
            logits[i], emb[i] = out["logits"][j], out["emb"][j]
            if out["attn"] is not None:
                attn[i] = out["attn"][j, : len(arrays.bags[i])].numpy()
    net.train(was)
    lg = torch.stack(logits)
    return {"risk": risk_of(lg, loss).numpy().astype(np.float64), "logits": lg.numpy(),
            "emb": torch.stack(emb).numpy(), "attn": attn}


def _rows_with_rna(out: dict, batch: dict) -> tuple[dict, dict | None]:
    """``out`` and ``batch`` restricted to the patients with an RNA profile (``batch["has_rna"]``;
    None: all); ``batch`` is None when no patient has one."""
    keep = batch.get("has_rna")
    if keep is None or bool(keep.all()):
        return out, batch
    if not bool(keep.any()):
        return out, None
    rows = (lambda d: {k: v[keep] if torch.is_tensor(v) else v for k, v in d.items()})  # noqa: E731
    return rows(out), rows(batch)


class SurvivalModule(L.LightningModule):
    """Trains ``net`` with the survival loss and, with a frozen ``teacher``, AMKD's distillation.

    ``cfg`` (a plain dict of :class:`~stdistill.recipes.SurvivalConfig` fields) sets the loss
    (``"nll"``/``"cox"``, ``alpha``), the optimiser (``lr``, ``weight_decay``) and the weights of the
    distillation terms: ``w_feat`` (student projection -> teacher ``emb``, cosine),
    ``w_rr`` (redundancy reduction: ``rr_form`` ``"batch"`` or ``"whitened"`` with ``rr_dim`` and
    ``rr_queue``; ``rr_weight`` ``"adaptive"``, ``"adaptive_down"`` or ``"fixed"``; ``rr_offdiag``)
    and ``w_logit`` (plain prediction KD); only patients with RNA (``has_rna``) enter them. ``score`` (optional, ``net -> float``) is called after
    each epoch; its values go to ``history``.
    """

    def __init__(self, net: nn.Module, cfg: dict, teacher: nn.Module | None = None,
                 score: Callable[[nn.Module], float] | None = None):
        super().__init__()
        self.net, self.cfg, self.teacher, self.score = net, dict(cfg), teacher, score
        if teacher is not None:
            teacher.requires_grad_(False)
        self.history: list[dict] = []
        self._losses: list[float] = []
        self._queue: tuple[torch.Tensor, ...] | None = None  # (student, teacher, weight) rows of earlier batches

    def survival_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.cfg["loss"] == "cox":
            return cox_loss(logits.view(-1), batch["event"], batch["time"])
        return nll_loss(logits, batch["y"], batch["event"], alpha=self.cfg["alpha"])

    def distill_terms(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        """The weighted distillation terms against the frozen teacher (empty without a teacher).

        Only patients with an RNA profile (``batch["has_rna"]``) enter them: the teacher sees their
        rows alone, and a batch without any such patient adds no term (zero, never NaN)."""
        cfg, terms = self.cfg, {}
        if self.teacher is None:
            return terms
        out, batch = _rows_with_rna(out, batch)
        if batch is None:
            return terms
        with torch.no_grad():
            t = run_net(self.teacher, batch)
        if cfg["w_feat"] or cfg["w_rr"]:
            z = self.net.proj(out["emb"])
            if cfg["w_feat"]:
                terms["feat"] = cfg["w_feat"] * feature_kd(z, t["emb"])
            rr = self.redundancy(z, t, out) if cfg["w_rr"] else None
            if rr is not None:
                terms["rr"] = cfg["w_rr"] * rr
        if cfg["w_logit"]:
            terms["logit"] = cfg["w_logit"] * logit_kd(out["logits"], t["logits"], cfg["loss"])
        return terms

    def redundancy(self, z: torch.Tensor, t: dict, out: dict) -> torch.Tensor | None:
        """The unweighted redundancy-reduction term of (B, D) projected student ``z`` and the teacher's
        output ``t``: ``rr_form="batch"``, :func:`redundancy_reduction` over the batch (None below 2
        rows); ``"whitened"``, :func:`whitened_redundancy` over the batch and the last ``rr_queue``
        rows of earlier batches (their student rows as computed then, without gradient)."""
        cfg = self.cfg
        w = None
        if cfg["rr_weight"] != "fixed" and (len(z) > 1 or cfg["rr_form"] != "batch"):
            w = discrepancy_weights(risk_of(t["logits"], cfg["loss"]), risk_of(out["logits"], cfg["loss"]),
                                    down=cfg["rr_weight"] == "adaptive_down")
        if cfg["rr_form"] == "batch":
            return redundancy_reduction(z, t["emb"], w, cfg["rr_offdiag"]) if len(z) > 1 else None
        rows = (z, t["emb"], torch.ones(len(z), dtype=z.dtype) if w is None else w)
        if self._queue is not None:
            rows = tuple(torch.cat([old, new]) for old, new in zip(self._queue, rows))
        if cfg["rr_queue"] > 0:
            self._queue = tuple(r.detach()[-cfg["rr_queue"]:] for r in rows)
        return whitened_redundancy(*rows, offdiag=cfg["rr_offdiag"], dim=cfg["rr_dim"])

    def training_step(self, batch: dict, _batch_idx: int) -> torch.Tensor:
        out = run_net(self.net, batch)
        loss = self.survival_loss(out["logits"], batch)
        for v in self.distill_terms(out, batch).values():
            loss = loss + v
        self._losses.append(float(loss.detach()))
        return loss

    def on_train_epoch_start(self) -> None:
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no dropout in the targets

    def on_train_epoch_end(self) -> None:
        row = {"epoch": self.current_epoch + 1, "train_loss": float(np.mean(self._losses)) if self._losses else float("nan")}
        if self.score is not None:
            row["val_cindex"] = float(self.score(self.net))
        self.history.append(row)
        self._losses = []

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=self.cfg["lr"],
                                 weight_decay=self.cfg["weight_decay"])
