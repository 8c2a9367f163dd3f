"""PEKA: parameter-efficient knowledge transfer from a transcriptomic teacher into an image encoder.

The image encoder (``stdistill.encoders.load(...).backbone``) gets a parameter-efficient adapter
from ``peft`` and is trained end to end on spot patches with three losses:

(i) **regression** of the spot's log1p expression of the target genes (z-scored on the training
    spots), MSE, from a linear head on the adapted features;
(ii) **knowledge distillation**: the teacher's embeddings (:class:`~stdistill.teachers.
    ExpressionTeacher`) are clustered into ``n_clusters`` groups by k-means; a classifier fitted
    on the teacher's embeddings gives soft targets; the student's projected embedding goes
    through the same (frozen) classifier and is matched by KL at temperature 2 (x T^2) with a
    hard-label share of 0.5 (:func:`stdistill.losses.distillation_loss`, as PEKA's code);
(iii) **structure alignment**: the within-batch cosine-similarity matrix of the student's
    projected embeddings is matched to the teacher's (:func:`stdistill.losses.structure_alignment`).

Adapters: ``"miss"`` (peft ``MissConfig``: block-affine, peft's successor of Bone;
``miss_init=True|"bat"|"mini"``) or ``"lora"`` (``LoraConfig``). Targets per architecture:

- timm ViTs: ``qkv`` of the trained blocks;
- timm EfficientNet/MobileNet-style CNNs (the default ``effnet-lite0-imagenet``): the pointwise
  1x1 convolutions (``conv_pw``, ``conv_pwl``, ``conv_head``) after the cut. peft's MiSS wraps only
  ``nn.Linear`` (``MissLinear``; a ``Conv2d`` raises), so each targeted 1x1 ``Conv2d`` is first
  rewritten as an exactly equivalent channels-last ``nn.Linear`` (:class:`Pointwise`); LoRA gets
  the same targets so the two adapters are compared on equal terms.

CPU budget: the frozen part of the network before the cut (``train_from``) is run **once** per
patch and its activations are cached (memory and disk); training then runs only the adapted tail.
The CNN default cuts inside the last block, after its depthwise convolution
(``"blocks.6.0.conv_pwl"``): the tail is ``conv_pwl`` -> ``conv_head`` -> pooling, so epochs are
cheap on a CPU. ``train_from="blocks.5"`` etc. adapts more stages (GPU); ``"input"`` trains from
pixels (no cache). Trained with Lightning (:func:`stdistill._lightning.make_trainer`), so the same
code runs on several GPUs by changing ``accelerator``/``devices``/``strategy``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .._errors import StdistillError
from .._utils import array_digest, atomic_path, file_digest, seed_everything
from ..io._section import SECTION_KEY, SPATIAL_KEY, library, sections as _sections

__all__ = ["PEKA", "PekaConfig", "Pointwise", "adapter_targets", "choose_peka", "default_train_from", "peka", "select_peka"]

_FORMAT = "stdistill.PEKA/1"
_ADAPTER_KEYS = ("miss_", "lora_")


# ================================================================================ configuration
@dataclass
class PekaConfig:
    """Settings of one PEKA run (all chosen on validation patients inside the training folds).

    ``rank=None`` gives MiSS r=128 / LoRA r=64 (about 6% of effnet-lite0's weights trainable with
    the default cut, near the ~5% of the seed paper).
    """

    adapter: str = "miss"  # "miss" | "lora" | "none" (heads only: the frozen-encoder ablation)
    rank: int | None = None
    miss_init: bool | str = True  # MissConfig.init_weights: True | "bat" | "mini"
    mini_r: int = 1
    lora_alpha: float | None = None  # default: = rank (scaling 1)
    train_from: str | None = None  # cut; None: per architecture (effnet: "blocks.6.0.conv_pwl")
    w_reg: float = 1.0
    w_kd: float = 1.0
    w_sa: float = 1.0
    temperature: float = 2.0
    hard_weight: float = 0.5
    n_clusters: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 20
    patience: int = 3
    batch_size: int = 64
    val_metric: str = "ridge"  # "ridge" (HEST probe Pearson on val) | "head" (head Pearson) | "mse"
    size_um: float = 112.0
    px: int = 224
    views: int = 1  # dihedral views of each patch cached through the trunk (training samples one)
    train_positions: int | None = None  # CNN: train on this many random positions of the cached map
    head_ridge: float = 1.0  # heads start at the ridge solution on frozen features, penalty head_ridge x n_spots
    seed: int = 0

    def __post_init__(self):
        if self.adapter not in ("miss", "lora", "none"):
            raise StdistillError(f"adapter must be 'miss', 'lora' or 'none', got {self.adapter!r}")
        if self.val_metric not in ("ridge", "head", "mse"):
            raise StdistillError(f"val_metric must be 'ridge', 'head' or 'mse', got {self.val_metric!r}")
        if not 1 <= self.views <= 8:
            raise StdistillError(f"views must be 1..8 (dihedral transforms), got {self.views}")
        for k in ("w_reg", "w_kd", "w_sa", "lr"):
            if getattr(self, k) < 0:
                raise StdistillError(f"{k} must be >= 0, got {getattr(self, k)}")

    @property
    def r(self) -> int:
        return self.rank if self.rank is not None else (128 if self.adapter == "miss" else 64)


# ================================================================================ backbone surgery
class Pointwise(nn.Module):
    """A 1x1 ``Conv2d`` (stride 1, no groups) as a channels-last ``nn.Linear`` (same weights, same output).

    peft's MiSS adapts only ``nn.Linear``; this makes the pointwise convolutions of CNNs adaptable.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise StdistillError(f"Pointwise needs a 1x1, stride-1, ungrouped Conv2d, got {conv}")
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight[:, :, 0, 0])
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _arch(backbone: nn.Module) -> str:
    if hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks"):
        return "vit"
    if hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks") and hasattr(backbone, "conv_head"):
        return "effnet"
    raise StdistillError(
        f"PEKA knows timm VisionTransformer and EfficientNet/MobileNet-style backbones, not {type(backbone).__name__}; "
        "register a timm ViT or EfficientNet encoder"
    )


def default_train_from(backbone: nn.Module) -> str:
    """The default cut: effnet: inside the last block, before its projection (``blocks.S.B.conv_pwl``)
    when that block has no skip connection, else the last stage; ViT: the last third of the blocks."""
    a = _arch(backbone)
    if a == "vit":
        n = len(backbone.blocks)
        return f"blocks.{n - max(1, n // 3)}"
    s = len(backbone.blocks) - 1
    b = len(backbone.blocks[s]) - 1
    blk = backbone.blocks[s][b]
    if hasattr(blk, "conv_pwl") and not getattr(blk, "has_skip", True):
        return f"blocks.{s}.{b}.conv_pwl"
    return f"blocks.{s}"


@dataclass(frozen=True)
class _Cut:
    arch: str
    stage: int = 0  # effnet stage / vit block index
    block: int = 0
    inner: bool = False  # effnet: cut before conv_pwl of (stage, block)
    input: bool = False


def _parse_cut(backbone: nn.Module, train_from: str | None) -> _Cut:
    a = _arch(backbone)
    tf = train_from or default_train_from(backbone)
    if tf == "input":
        return _Cut(a, input=True)
    parts = tf.split(".")
    try:
        if parts[0] != "blocks":
            raise ValueError
        if a == "vit":
            if len(parts) != 2:
                raise ValueError
            k = int(parts[1])
            if not 0 <= k < len(backbone.blocks):
                raise ValueError
            return _Cut(a, stage=k)
        s = int(parts[1])
        b = int(parts[2]) if len(parts) >= 3 else 0
        inner = len(parts) == 4 and parts[3] == "conv_pwl"
        if len(parts) > 4 or (len(parts) == 4 and not inner) or not 0 <= s < len(backbone.blocks) or not 0 <= b < len(backbone.blocks[s]):
            raise ValueError
        if inner:
            blk = backbone.blocks[s][b]
            if not hasattr(blk, "conv_pwl") or getattr(blk, "has_skip", True):
                raise StdistillError(f"train_from={tf!r}: can cut before conv_pwl only in a block without a skip connection")
        return _Cut(a, stage=s, block=b, inner=inner)
    except (ValueError, IndexError):
        raise StdistillError(
            f"train_from={tf!r} is not a cut of this {a}: use 'input', 'blocks.K' (ViT), or 'blocks.S', 'blocks.S.B', "
            "'blocks.S.B.conv_pwl' (EfficientNet)"
        ) from None


def _tail_blocks(backbone: nn.Module, cut: _Cut) -> list[tuple[str, nn.Module]]:
    """(name, module) of the blocks run after the cut (names relative to the backbone)."""
    if cut.arch == "vit":
        start = 0 if cut.input else cut.stage
        return [(f"blocks.{i}", backbone.blocks[i]) for i in range(start, len(backbone.blocks))]
    out = []
    for s in range(len(backbone.blocks)):
        for b in range(len(backbone.blocks[s])):
            if cut.input or (s, b) > (cut.stage, cut.block) or ((s, b) == (cut.stage, cut.block) and not cut.inner):
                out.append((f"blocks.{s}.{b}", backbone.blocks[s][b]))
    return out


def adapter_targets(backbone: nn.Module, train_from: str | None = None) -> list[str]:
    """Module names PEKA adapts: ViT ``blocks.i.attn.qkv`` after the cut; EfficientNet the 1x1
    convolutions after the cut (``conv_pw``, ``conv_pwl``, ``conv_head``), as they are named
    *before* :class:`Pointwise` rewriting."""
    cut = _parse_cut(backbone, train_from)
    if cut.arch == "vit":
        return [f"{n}.attn.qkv" for n, _ in _tail_blocks(backbone, cut)]
    names = []
    if cut.inner:
        names.append(f"blocks.{cut.stage}.{cut.block}.conv_pwl")
    for n, blk in _tail_blocks(backbone, cut):
        for child in ("conv_pw", "conv_pwl"):
            m = getattr(blk, child, None)
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
                names.append(f"{n}.{child}")
    names.append("conv_head")
    return names


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def add_adapter(backbone: nn.Module, cfg: PekaConfig) -> dict:
    """Insert the adapter into ``backbone`` in place; freeze everything else. Returns counts."""
    import peft

    for p in backbone.parameters():
        p.requires_grad_(False)
    n_base = sum(p.numel() for p in backbone.parameters())
    cut = _parse_cut(backbone, cfg.train_from)
    targets = adapter_targets(backbone, cfg.train_from)
    if cfg.adapter == "none":
        return {"adapter": "none", "targets": [], "n_base": n_base, "n_trainable": 0, "share": 0.0}
    if cut.arch == "effnet":
        peft_targets = []
        for t in targets:
            m = backbone.get_submodule(t)
            if isinstance(m, nn.Conv2d):
                _set_module(backbone, t, Pointwise(m).to(m.weight.device))
            peft_targets.append(f"{t}.linear")
    else:
        peft_targets = targets
    r = cfg.r
    if cfg.adapter == "miss":
        conf = peft.MissConfig(r=r, target_modules=peft_targets, init_weights=cfg.miss_init, mini_r=cfg.mini_r)
    else:
        conf = peft.LoraConfig(r=r, lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else r,
                               target_modules=peft_targets, lora_dropout=0.0, init_lora_weights=True)
    try:
        peft.inject_adapter_in_model(conf, backbone)
    except (ValueError, TypeError) as e:
        raise StdistillError(f"peft could not add a {cfg.adapter} adapter with r={r}: {e}") from None
    n_train = 0
    for n, p in backbone.named_parameters():
        is_adapter = any(k in n for k in _ADAPTER_KEYS)
        p.requires_grad_(is_adapter)
        n_train += p.numel() if is_adapter else 0
    return {"adapter": cfg.adapter, "rank": r, "targets": targets, "n_base": n_base, "n_trainable": n_train,
            "share": n_train / n_base}


class _Tail(nn.Module):
    """Runs the encoder from the cut to its pooled (B, dim) features. Frozen layers stay in eval mode."""

    def __init__(self, encoder, cut: _Cut):
        super().__init__()
        self.encoder = encoder
        self.cut = cut

    def train(self, mode: bool = True):  # BatchNorm statistics and dropout of the frozen encoder stay fixed
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        enc, cut = self.encoder, self.cut
        bb = enc.backbone
        if cut.input:
            return enc.features(enc.preprocess(h))
        if cut.arch == "vit":
            for i in range(cut.stage, len(bb.blocks)):
                h = bb.blocks[i](h)
            h = bb.norm(h)
            if enc.spec.pooling == "cls+mean_patch":
                n_prefix = int(getattr(bb, "num_prefix_tokens", 1))
                return torch.cat([h[:, 0], h[:, n_prefix:].mean(dim=1)], dim=-1)
            return bb.forward_head(h, pre_logits=True)
        if cut.inner:
            blk = bb.blocks[cut.stage][cut.block]
            h = blk.bn3(blk.conv_pwl(h))
        for _, blk in _tail_blocks(bb, cut):
            h = blk(h)
        h = bb.bn2(bb.conv_head(h))
        return bb.forward_head(h, pre_logits=True) if hasattr(bb, "forward_head") else bb.global_pool(h).flatten(1)


@torch.inference_mode()
def _trunk(encoder, cut: _Cut, x: torch.Tensor) -> torch.Tensor:
    """Frozen activations at the cut for uint8 patches (B, 3, px, px)."""
    if cut.input:
        return x
    bb = encoder.backbone
    h = encoder.preprocess(x)
    if cut.arch == "vit":
        h = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(h))))
        for i in range(cut.stage):
            h = bb.blocks[i](h)
        return h
    h = bb.bn1(bb.conv_stem(h))
    for s in range(len(bb.blocks)):
        for b in range(len(bb.blocks[s])):
            if (s, b) < (cut.stage, cut.block):
                h = bb.blocks[s][b](h)
    if cut.inner:
        blk = bb.blocks[cut.stage][cut.block]
        h = blk.se(blk.aa(blk.bn2(blk.conv_dw(blk.bn1(blk.conv_pw(h))))))
    return h.contiguous()


def _dihedral(x: torch.Tensor, v: int) -> torch.Tensor:
    """The v-th of the 8 dihedral transforms of (B, 3, H, W) patches (0 = identity)."""
    if v >= 4:
        x = x.flip(-1)
    return torch.rot90(x, v % 4, dims=(-2, -1))


# ================================================================================ trunk cache
_MEM_CACHE: dict[str, torch.Tensor] = {}


def _default_cache_root() -> Path:
    env = os.environ.get("STDISTILL_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "stdistill") / "peka_trunk"


def _section_image_digest(adata: ad.AnnData, s: str) -> str:
    lib = library(adata, s)
    if "fullres" in lib.get("images", {}):
        return array_digest(np.asarray(lib["images"]["fullres"]))
    return file_digest(lib["metadata"]["source_image_path"])


def trunk_activations(
    encoder, adata: ad.AnnData, cfg: PekaConfig, *, cache_dir: str | os.PathLike | bool | None = None,
    batch_size: int = 64, device: str = "cpu",
) -> torch.Tensor:
    """(n_spots, views, *shape) float16 frozen activations at the cut (uint8 patches for ``"input"``).

    Computed once per section and kept in memory and on disk (``cache_dir``; ``None``:
    ``$STDISTILL_CACHE/peka_trunk`` or ``~/.cache/stdistill/peka_trunk``; ``False``: memory only),
    keyed by the encoder's weights digest, the cut, the patch geometry, the image's and the spot
    coordinates' digests.
    """
    from ..pp.patches import PatchDataset

    cut = _parse_cut(encoder.backbone, cfg.train_from)
    root = None if cache_dir is False else (Path(cache_dir) if cache_dir not in (None, True) else _default_cache_root())
    sec_of = adata.obs[SECTION_KEY].astype(str).to_numpy()
    parts = []
    for s in _sections(adata):
        m = np.flatnonzero(sec_of == s)
        key = array_digest(np.frombuffer(json.dumps({
            "enc": encoder.spec.name, "w": encoder.weights_digest, "cut": str(cut), "size_um": cfg.size_um, "px": cfg.px,
            "views": cfg.views, "img": _section_image_digest(adata, s),
            "xy": array_digest(np.asarray(adata.obsm[SPATIAL_KEY][m], dtype=np.float64)),
            "mpp": library(adata, s)["scalefactors"].get("microns_per_pixel"),
        }, sort_keys=True).encode(), dtype=np.uint8))
        t = _MEM_CACHE.get(key)
        path = root / f"{key}.npy" if root is not None else None
        if t is None and path is not None and path.is_file():
            try:
                t = torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError):
                t = None
            if t is not None and t.shape[0] != len(m):
                t = None
        if t is None:
            sub = adata[m]
            ds = PatchDataset(sub, size_um=cfg.size_um, px=cfg.px)
            outs = []
            encoder.to(device)
            for xb, _ in ds.loader(batch_size=batch_size):
                vs = [_trunk(encoder, cut, _dihedral(xb, v).to(device)).cpu() for v in range(cfg.views)]
                vs = torch.stack(vs, 1)
                outs.append(vs if cut.input else vs.to(torch.float16))
            t = torch.cat(outs)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, t.numpy(), allow_pickle=False)
        _MEM_CACHE[key] = t
        parts.append((m, t))
    n = adata.n_obs
    shape = parts[0][1].shape[1:]
    out = torch.empty((n, *shape), dtype=parts[0][1].dtype)
    for m, t in parts:
        out[torch.from_numpy(m)] = t
    return out


# ================================================================================ model
class PekaNet(nn.Module):
    """Adapted tail + heads. ``forward(h) -> (features (B, dim), gene predictions (B, G) z-scored,
    projection (B, D_t), class logits (B, C))``."""

    def __init__(self, tail: _Tail, dim: int, n_genes: int, proj_dim: int, cls_w: torch.Tensor, cls_b: torch.Tensor):
        super().__init__()
        self.tail = tail
        self.register_buffer("feat_mu", torch.zeros(dim))
        self.register_buffer("feat_sd", torch.ones(dim))
        self.reg = nn.Linear(dim, n_genes)
        self.proj = nn.Linear(dim, proj_dim)
        self.register_buffer("cls_w", cls_w.clone())  # frozen teacher classifier (C, D_t)
        self.register_buffer("cls_b", cls_b.clone())

    def forward(self, h: torch.Tensor):
        f = self.tail(h)
        z = (f - self.feat_mu) / self.feat_sd
        e = self.proj(z)
        return f, self.reg(z), e, e @ self.cls_w.T + self.cls_b


def _ridge_init(lin: nn.Linear, X: torch.Tensor, Y: torch.Tensor, lam_frac: float = 0.1) -> None:
    """Set a linear head to the ridge solution on (standardised) X -> Y (with intercept)."""
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


def _pearson_mean(Y: np.ndarray, P: np.ndarray) -> float:
    from ..metrics import pearson_per_gene

    return float(np.nanmean(pearson_per_gene(Y, P).to_numpy()))


def _make_module(net: PekaNet, data: dict, cfg: PekaConfig, val: dict | None, history: list):
    import lightning as L

    from ..losses import distillation_loss, structure_alignment

    class PekaModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.best_score = float("inf")
            self.best_state = None
            self.best_epoch = -1

        def _batch(self, idx: torch.Tensor, part: dict, train: bool):
            h = part["h"][idx.cpu()]
            if train and h.shape[1] > 1:
                v = torch.randint(h.shape[1], (len(idx),), generator=self._gen)
                h = h[torch.arange(len(idx)), v]
            else:
                h = h[:, 0]
            if train and cfg.train_positions and h.dtype != torch.uint8 and h.ndim == 4:
                # the tail after the default cut is pointwise + average pooling: a random subset of
                # map positions is a cheaper, noisier view of the same patch (a crop-like augmentation)
                k = min(cfg.train_positions, h.shape[2] * h.shape[3])
                sel = torch.randperm(h.shape[2] * h.shape[3], generator=self._gen)[:k]
                h = h.flatten(2)[:, :, sel].unsqueeze(-1)
            return h.to(self.device).float() if h.dtype != torch.uint8 else h.to(self.device)

        def on_fit_start(self):
            self._gen = torch.Generator().manual_seed(cfg.seed)
            if val is not None:  # epoch 0 = the frozen encoder with ridge-initialised heads
                rec = {"epoch": 0}
                self.net.eval()
                self.best_score = self._val_score(rec)
                self.net.train()
                self.best_epoch = -1
                self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()
                                   if _trainable_key(self.net, k)}
                history.append(rec)

        def training_step(self, batch, _):
            (idx,) = batch
            h = self._batch(idx, data, True)
            _, pred, emb, logits = self.net(h)
            y = data["y"][idx.cpu()].to(self.device)
            loss = torch.zeros((), device=self.device)
            parts = {}
            if cfg.w_reg:
                parts["reg"] = F.mse_loss(pred, y)
                loss = loss + cfg.w_reg * parts["reg"]
            if cfg.w_kd:
                parts["kd"] = distillation_loss(logits, data["p"][idx.cpu()].to(self.device), cfg.temperature, cfg.hard_weight)
                loss = loss + cfg.w_kd * parts["kd"]
            if cfg.w_sa:
                parts["sa"] = structure_alignment(emb, data["t"][idx.cpu()].to(self.device))
                loss = loss + cfg.w_sa * parts["sa"]
            parts["loss"] = loss
            for k, v in parts.items():
                s, c = self._sums.get(k, (0.0, 0))
                self._sums[k] = (s + float(v.detach()) * len(idx), c + len(idx))
            return loss

        def on_train_epoch_start(self):
            self._sums = {}

        @torch.no_grad()
        def _features(self, part: dict) -> tuple[np.ndarray, np.ndarray]:
            fs, ps = [], []
            n = len(part["h"])
            for i in range(0, n, 256):
                idx = torch.arange(i, min(n, i + 256))
                f, p, _, _ = self.net(self._batch(idx, part, False))
                fs.append(f.float().cpu())
                ps.append(p.float().cpu())
            return torch.cat(fs).numpy(), torch.cat(ps).numpy()

        def on_train_epoch_end(self):
            rec = {"epoch": self.current_epoch + 1}
            rec.update({f"train_{k}": s / max(c, 1) for k, (s, c) in self._sums.items()})
            if val is not None:
                self.net.eval()
                score = self._val_score(rec)
                self.net.train()
                self.log("val_score", score, prog_bar=False)
                if score < self.best_score:
                    self.best_score, self.best_epoch = score, self.current_epoch
                    self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()
                                       if _trainable_key(self.net, k)}
            history.append(rec)

        def _val_score(self, rec: dict) -> float:
            fv, pv = self._features(val)
            rec["val_mse"] = float(np.mean((pv - val["y"].numpy()) ** 2))
            rec["val_head_pearson"] = _pearson_mean(val["y"].numpy(), pv)
            if cfg.val_metric == "ridge":
                from ..bench.expression import HestRidge

                ft, _ = self._features(data)
                probe = HestRidge(latent_dim=256, seed=1, svd_solver="covariance_eigh").fit(ft, data["y"].numpy())
                rec["val_ridge_pearson"] = _pearson_mean(val["y"].numpy(), probe.predict(fv))
                return -rec["val_ridge_pearson"]
            if cfg.val_metric == "head":
                return -rec["val_head_pearson"]
            return rec["val_mse"]

        def configure_optimizers(self):
            params = [p for p in self.net.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    return PekaModule()


def _trainable_key(net: nn.Module, key: str) -> bool:
    return any(k in key for k in _ADAPTER_KEYS) or key.startswith(("reg.", "proj."))


# ================================================================================ the estimator
class PEKA:
    """PEKA as an estimator: ``fit`` on training spots (patches + targets + teacher embeddings),
    then ``transform`` (adapted features) or ``predict`` (log1p expression) on any spots with images.

    Parameters
    ----------
    encoder
        Encoder name (``stdistill.encoders``) or a loaded :class:`~stdistill.encoders.Encoder`
        (copied; the original is not modified). The offline default is an ImageNet model.
    config
        :class:`PekaConfig`; keyword ``overrides`` replace its fields.
    device, accelerator, devices, strategy
        Trunk caching device and Lightning's settings (several GPUs: ``devices=4, strategy="ddp"``).
    cache_dir
        Trunk-activation cache (see :func:`trunk_activations`).
    """

    def __init__(self, encoder="effnet-lite0-imagenet", config: PekaConfig | None = None, *, device: str = "cpu",
                 accelerator: str = "cpu", devices="auto", strategy: str = "auto",
                 cache_dir: str | os.PathLike | bool | None = None, **overrides):
        self.config = replace(config or PekaConfig(), **overrides)
        self.encoder_arg = encoder
        self.device, self.accelerator, self.devices, self.strategy = device, accelerator, devices, strategy
        self.cache_dir = cache_dir

    # -------------------------------------------------------------- building
    def _load_encoder(self):
        from .. import encoders

        if isinstance(self.encoder_arg, str):
            return encoders.load(self.encoder_arg, device="cpu")
        return copy.deepcopy(self.encoder_arg).cpu()

    def _frozen_encoder(self):
        if not hasattr(self, "_frozen"):
            self._frozen = self._load_encoder().eval()
        return self._frozen

    def _targets(self, adata: ad.AnnData, genes: Sequence[str]) -> np.ndarray:
        from ..pp.genes import log1p_targets

        return log1p_targets(adata, genes)

    # -------------------------------------------------------------- fit
    def fit(
        self,
        adata: ad.AnnData,
        teacher: str | np.ndarray,
        genes: Sequence[str],
        *,
        kd_reference: np.ndarray | None = None,
        kd_classifier: tuple[np.ndarray, np.ndarray] | None = None,
        val: ad.AnnData | None = None,
    ) -> PEKA:
        """Train on ``adata``'s spots (each section with an image).

        Parameters
        ----------
        adata
            Training spots (training patients only) with raw counts.
        teacher
            (n_spots, D_t) teacher embeddings of ``adata``'s spots, or an ``obsm`` key holding them.
        genes
            Target genes (chosen on training sections, e.g. :func:`stdistill.pp.hest_genes`).
        kd_reference
            Teacher embeddings on which k-means and the KD classifier are fitted (e.g. every spot
            of the training patients, with or without image); default: ``teacher``.
        kd_classifier
            Precomputed ``(W, b)`` from :func:`stdistill.teachers.expression.teacher_targets`
            (to share one classifier between runs); default: fitted here on ``kd_reference``.
        val
            Validation spots (a validation patient inside the training folds) for early
            stopping and for choosing settings; ``None``: train ``max_epochs`` epochs.
        """
        from .._lightning import make_trainer
        from ..teachers.expression import teacher_targets

        cfg = self.config
        t0 = time.time()
        seed_everything(cfg.seed)
        T = np.asarray(adata.obsm[teacher] if isinstance(teacher, str) else teacher, dtype=np.float32)
        if T.shape[0] != adata.n_obs or T.ndim != 2 or not np.isfinite(T).all():
            raise StdistillError(f"teacher embeddings must be finite (n_spots={adata.n_obs}, D), got {T.shape}")
        if val is not None:
            from ..pp.splits import check_patient_disjoint

            check_patient_disjoint(adata, val)
        self.genes_ = list(genes)
        Y = self._targets(adata, self.genes_)
        self.y_mean_, self.y_std_ = Y.mean(0), Y.std(0)
        self.y_std_[self.y_std_ == 0] = 1.0
        Yz = (Y - self.y_mean_) / self.y_std_
        if kd_classifier is not None:
            W, b = (np.asarray(x, dtype=np.float32) for x in kd_classifier)
            if W.ndim != 2 or W.shape[1] != T.shape[1] or b.shape != (W.shape[0],):
                raise StdistillError(f"kd_classifier must be (W (C, {T.shape[1]}), b (C,)), got {W.shape}, {b.shape}")
        else:
            ref = T if kd_reference is None else np.asarray(kd_reference, dtype=np.float32)
            W, b, _, _ = teacher_targets(ref, n_clusters=cfg.n_clusters, seed=cfg.seed)
        logits = T @ W.T + b
        P = np.exp(logits - logits.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)

        frozen = self._frozen_encoder()
        H = trunk_activations(frozen, adata, cfg, cache_dir=self.cache_dir, device=self.device)
        enc = copy.deepcopy(frozen)  # the adapted copy shares the frozen trunk's weights exactly
        self.adapter_info_ = add_adapter(enc.backbone, cfg)
        cut = _parse_cut(frozen.backbone, cfg.train_from)
        tail = _Tail(enc, cut)
        dim = enc.spec.dim
        # the projection maps to the teacher's width: the frozen KD classifier reads it
        net = PekaNet(tail, dim, len(self.genes_), T.shape[1], torch.from_numpy(W), torch.from_numpy(b))
        # frozen features: standardisation and ridge-initialised heads (training starts at the linear probe)
        net.eval()
        with torch.no_grad():
            F0 = torch.cat([net.tail(_as_input(H[i:i + 256, 0])) for i in range(0, len(H), 256)]).float()
        net.feat_mu.copy_(F0.mean(0))
        net.feat_sd.copy_(F0.std(0).clamp_min(1e-6))
        Z0 = (F0 - net.feat_mu) / net.feat_sd
        _ridge_init(net.reg, Z0, torch.from_numpy(Yz), cfg.head_ridge)
        _ridge_init(net.proj, Z0, torch.from_numpy(T), cfg.head_ridge)
        data = {"h": H, "y": torch.from_numpy(Yz.astype(np.float32)), "t": torch.from_numpy(T), "p": torch.from_numpy(P.astype(np.float32))}
        vdata = None
        if val is not None:
            Hv = trunk_activations(frozen, val, cfg, cache_dir=self.cache_dir, device=self.device)
            Yv = (self._targets(val, self.genes_) - self.y_mean_) / self.y_std_
            vdata = {"h": Hv, "y": torch.from_numpy(Yv.astype(np.float32))}
        self.history_ = []
        module = _make_module(net, data, cfg, vdata, self.history_)
        g = torch.Generator().manual_seed(cfg.seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(len(H))), batch_size=cfg.batch_size,
                                             shuffle=True, generator=g, drop_last=len(H) > cfg.batch_size)
        trainer = make_trainer(
            max_epochs=cfg.max_epochs, accelerator=self.accelerator, devices=self.devices, strategy=self.strategy,
            monitor="val_score" if val is not None else None, patience=cfg.patience, enable_progress_bar=False,
            num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
        )
        import warnings

        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen encoder stays in eval mode on purpose
        denormal = torch.set_flush_denormal(True)  # tiny adapter updates otherwise hit slow denormal floats on CPUs
        try:
            if any(p.requires_grad for p in net.parameters()) and cfg.max_epochs > 0:
                trainer.fit(module, train_dataloaders=loader)
        finally:
            torch.set_flush_denormal(False) if denormal else None
        if module.best_state is not None:  # restore the best validation epoch
            net.load_state_dict(module.best_state, strict=False)
        self.best_epoch_ = module.best_epoch + 1 if module.best_state is not None else len(self.history_)
        self.best_val_score_ = -module.best_score if val is not None and cfg.val_metric != "mse" else module.best_score
        net.eval()
        self.net_ = net
        self.fit_seconds_ = time.time() - t0
        return self

    # -------------------------------------------------------------- inference
    def _check(self):
        if not hasattr(self, "net_"):
            raise StdistillError("PEKA is not fitted; call fit() first (or PEKA.load(path))")

    @torch.no_grad()
    def _run(self, adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
        self._check()
        H = trunk_activations(self._frozen_encoder(), adata, self.config, cache_dir=self.cache_dir, device=self.device)
        self.net_.eval()
        fs, ps = [], []
        for i in range(0, len(H), 256):
            f, p, _, _ = self.net_(_as_input(H[i:i + 256, 0]))
            fs.append(f.float())
            ps.append(p.float())
        return torch.cat(fs).numpy(), torch.cat(ps).numpy()

    def transform(self, adata: ad.AnnData, key_added: str | None = "X_peka") -> np.ndarray:
        """(n_spots, dim) float32 adapted-encoder features; writes ``obsm[key_added]`` unless None."""
        f, _ = self._run(adata)
        if key_added:
            adata.obsm[key_added] = f.astype(np.float32)
        return f.astype(np.float32)

    def predict(self, adata: ad.AnnData) -> pd.DataFrame:
        """(n_spots x genes) predicted log1p expression from the regression head."""
        _, p = self._run(adata)
        return pd.DataFrame(p * self.y_std_ + self.y_mean_, index=adata.obs_names, columns=self.genes_)

    @property
    def trainable_share(self) -> float:
        """Adapter parameters / encoder parameters (heads not counted)."""
        self._check()
        return float(self.adapter_info_["share"])

    def report(self) -> dict:
        self._check()
        heads = sum(p.numel() for n, p in self.net_.named_parameters() if n.startswith(("reg.", "proj.")))
        return {**{k: v for k, v in self.adapter_info_.items() if k != "targets"}, "n_targets": len(self.adapter_info_["targets"]),
                "n_head_params": heads, "best_epoch": self.best_epoch_, "fit_seconds": round(self.fit_seconds_, 1)}

    # -------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Adapter + heads as safetensors, settings and genes as JSON metadata (no pickle)."""
        from safetensors.torch import save_file

        self._check()
        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net_.state_dict().items()
                 if _trainable_key(self.net_, k) or k in ("feat_mu", "feat_sd", "cls_w", "cls_b")}
        state["y_mean"] = torch.from_numpy(self.y_mean_.astype(np.float32))
        state["y_std"] = torch.from_numpy(self.y_std_.astype(np.float32))
        enc = self.encoder_arg if isinstance(self.encoder_arg, str) else self._frozen_encoder().spec.name
        meta = {"format": _FORMAT, "encoder": enc, "config": json.dumps(asdict(self.config)), "genes": json.dumps(self.genes_),
                "adapter_info": json.dumps({k: v for k, v in self.adapter_info_.items()})}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, encoder=None, **kw) -> PEKA:
        """Rebuild a saved model. ``encoder``: a name or Encoder when the saved one is not in the registry."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as e:
            raise StdistillError(f"not a readable safetensors file ({type(e).__name__})", path) from None
        if meta.get("format") != _FORMAT:
            raise StdistillError(f"not a stdistill PEKA model (format {meta.get('format')!r})", path)
        cfg = PekaConfig(**json.loads(meta["config"]))
        self = cls(encoder or meta["encoder"], cfg, **kw)
        self.genes_ = json.loads(meta["genes"])
        enc = copy.deepcopy(self._frozen_encoder())
        self.adapter_info_ = add_adapter(enc.backbone, cfg)
        cut = _parse_cut(enc.backbone, cfg.train_from)
        net = PekaNet(_Tail(enc, cut), enc.spec.dim, len(self.genes_), state["proj.weight"].shape[0],
                      state["cls_w"], state["cls_b"])
        self.y_mean_, self.y_std_ = state.pop("y_mean").numpy(), state.pop("y_std").numpy()
        missing, unexpected = net.load_state_dict(state, strict=False)
        bad = [k for k in missing if _trainable_key(net, k)]
        if bad or unexpected:
            raise StdistillError(f"saved weights do not fit the encoder ({(bad + unexpected)[:3]})", path)
        self.net_ = net.eval()
        self.best_epoch_, self.fit_seconds_, self.history_ = -1, 0.0, []
        return self


def _as_input(h: torch.Tensor) -> torch.Tensor:
    return h if h.dtype == torch.uint8 else h.float()


# ================================================================================ recipe functions
def peka(
    adata: ad.AnnData,
    teacher: str | np.ndarray,
    genes: Sequence[str],
    *,
    train_sections: Sequence[str] | None = None,
    val_sections: Sequence[str] | None = None,
    kd_reference: np.ndarray | None = None,
    encoder="effnet-lite0-imagenet",
    config: PekaConfig | None = None,
    key_added: str | None = "X_peka",
    **kw,
) -> PEKA:
    """Fit PEKA on ``train_sections`` (early stopping on ``val_sections``, which must be other
    patients), then write adapted features of **every** spot to ``obsm[key_added]``.

    ``teacher``: an ``obsm`` key or (n_obs, D_t) array (rows of non-training spots are ignored).
    Returns the fitted :class:`PEKA`.
    """
    from ..io._section import subset_sections
    from ..pp.splits import check_split

    secs = _sections(adata)
    train_sections = list(train_sections or [s for s in secs if s not in set(val_sections or [])])
    pats = dict(zip(adata.obs[SECTION_KEY].astype(str), adata.obs["patient"].astype(str)))
    if val_sections:
        check_split(train_sections, list(val_sections), pats)
    T = np.asarray(adata.obsm[teacher] if isinstance(teacher, str) else teacher, dtype=np.float32)
    mtr = adata.obs[SECTION_KEY].astype(str).isin(train_sections).to_numpy()
    tr = subset_sections(adata, train_sections)
    va = subset_sections(adata, list(val_sections)) if val_sections else None
    model = PEKA(encoder, config, **kw).fit(tr, T[mtr], genes, kd_reference=kd_reference, val=va)
    if key_added:
        model.transform(adata, key_added=key_added)
    return model


_VAL_KEYS = {"ridge": "val_ridge_pearson", "head": "val_head_pearson", "mse": "val_mse"}


def select_peka(
    adata: ad.AnnData,
    teacher: np.ndarray,
    genes: Sequence[str],
    grid: Sequence[dict],
    *,
    base: PekaConfig | None = None,
    kd_reference: np.ndarray | None = None,
    inner: Callable[[ad.AnnData, str], dict] | None = None,
    encoder="effnet-lite0-imagenet",
    **kw,
) -> tuple[PekaConfig, pd.DataFrame]:
    """Choose settings and epochs by leave-one-patient-out **inside** ``adata`` (a fold's training patients).

    Each candidate (``base`` updated with one ``grid`` dict) is trained for ``base.max_epochs``
    epochs on every inner split (one training patient held out for validation), recording the
    validation curve: the ``base.val_metric`` score after each epoch, epoch 0 being the frozen
    encoder. Curves are averaged over the inner splits and the best (candidate, epoch) wins
    (:func:`choose_peka`); epoch 0 wins when no adaptation beats the frozen encoder.

    Parameters
    ----------
    teacher
        (n_obs, D_t) teacher embeddings of ``adata``'s spots.
    inner
        Optional ``inner(inner_train, val_patient) -> dict`` re-deriving, without the validation
        patient, any of ``"teacher"`` (embeddings of ``inner_train``'s spots), ``"genes"`` and
        ``"kd_classifier"`` (the strict way: then nothing about the validation patient reaches
        training). Default: ``teacher`` rows and ``genes`` as given.

    Returns
    -------
    The chosen config (``max_epochs`` = chosen epochs) and a table with one row per candidate x
    validation patient (``candidate``, the grid keys, ``val_patient``, ``curve``: list of
    scores for epochs 0..max_epochs, ``seconds``).
    """
    from ..io._section import PATIENT_KEY, subset_sections

    base = base or PekaConfig()
    pats = adata.obs[PATIENT_KEY].astype(str).to_numpy()
    secs = adata.obs[SECTION_KEY].astype(str).to_numpy()
    uniq = sorted(set(pats))
    if len(uniq) < 2:
        raise StdistillError(f"choosing settings needs at least 2 training patients (one for validation), got {uniq}")
    if base.max_epochs < 1:
        raise StdistillError(f"choosing settings needs base.max_epochs >= 1, got {base.max_epochs}")
    splits = []
    for vp in uniq:
        tr = subset_sections(adata, sorted(set(secs[pats != vp])))
        parts = {"teacher": np.asarray(teacher)[pats != vp], "genes": list(genes), "kd_classifier": None,
                 **(inner(tr, vp) if inner is not None else {})}
        splits.append((vp, tr, subset_sections(adata, sorted(set(secs[pats == vp]))), parts))
    rows = []
    for ci, upd in enumerate(grid):
        cfg = replace(base, **upd, patience=base.max_epochs + 1)  # full curves: no early stopping
        for vp, tr, va, parts in splits:
            model = PEKA(encoder, cfg, **kw).fit(tr, parts["teacher"], parts["genes"], kd_reference=kd_reference,
                                                 kd_classifier=parts["kd_classifier"], val=va)
            rows.append({"candidate": ci, **upd, "val_patient": vp,
                         "curve": [h[_VAL_KEYS[cfg.val_metric]] for h in model.history_],
                         "seconds": round(model.fit_seconds_, 1)})
    table = pd.DataFrame(rows)
    return choose_peka(table, grid, base), table


def choose_peka(table: pd.DataFrame, grid: Sequence[dict], base: PekaConfig | None = None,
                where: Callable[[dict], bool] | None = None) -> PekaConfig:
    """The best (candidate, epoch) of :func:`select_peka`'s table: validation curves averaged over
    the inner splits, among the candidates whose grid dict passes ``where`` (default: all).

    Returns ``base`` updated with the winner and ``max_epochs`` = its epoch (0: the frozen encoder).
    """
    base = base or PekaConfig()
    sign = 1.0 if base.val_metric == "mse" else -1.0  # lower is better after the sign
    best = None  # (signed mean score, candidate, epoch)
    for ci, upd in enumerate(grid):
        if where is not None and not where(upd):
            continue
        curves = list(table.loc[table["candidate"] == ci, "curve"])
        if not curves:
            continue
        n = min(map(len, curves))
        loss = sign * np.mean([c[:n] for c in curves], axis=0)
        ep = int(np.argmin(loss))
        if best is None or loss[ep] < best[0]:
            best = (loss[ep], ci, ep)
    if best is None:
        raise StdistillError("no candidate of the grid passes `where` (or the table is empty)")
    _, ci, ep = best
    return replace(base, **grid[ci], max_epochs=ep)


class _CallableModule(__import__("types").ModuleType):
    """``stdistill.recipes.peka`` is both this module and the function: calling the module calls it."""

    def __call__(self, *args, **kwargs):
        return peka(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
