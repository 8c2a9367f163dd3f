"""The frozen trunk (run once per patch, cached) and the trainable tail of a cut encoder.

The trunk uses timm's ``forward_intermediates`` at block / stage boundaries; the two cuts timm
does not expose (ViT before block 0, EfficientNet inside a stage or inside a block) are finished
in :func:`_finish_trunk`, one arch-keyed function. ``tests/test_adapters.py`` checks trunk + tail
against the whole encoder for every kind of cut.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import torch
from torch import nn

from .._errors import StdistillError
from .._utils import array_digest, atomic_path, env_bytes, file_digest
from ..io._section import SECTION_KEY, SPATIAL_KEY, library, sections as _sections
from ._config import AdapterConfig
from ._cut import Cut, parse_cut, tail_blocks

if TYPE_CHECKING:
    from ..pp._stain import StainNormalizer

#: patches per section its stain is estimated from (as ``features.extract``)
STAIN_SAMPLE = 64


def _vit_trunk(bb: nn.Module, cut: Cut, h: torch.Tensor) -> torch.Tensor:
    if cut.stage == 0:  # not exposed by forward_intermediates: the embedded tokens before block 0
        return bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(h))))
    (out,) = bb.forward_intermediates(h, indices=[cut.stage - 1], stop_early=True, intermediates_only=True,
                                      output_fmt="NLC", return_prefix_tokens=True)
    return torch.cat([out[1], out[0]], dim=1) if isinstance(out, tuple) else out


def _effnet_trunk(bb: nn.Module, cut: Cut, h: torch.Tensor) -> torch.Tensor:
    # stage boundary from timm (index 0 = stem, index S = after stage S-1), then the part of stage S
    (h,) = bb.forward_intermediates(h, indices=[cut.stage], stop_early=True, intermediates_only=True, extra_blocks=True)
    for b in range(cut.block):
        h = bb.blocks[cut.stage][b](h)
    if cut.inner:  # inside the block: up to (and including) squeeze-excitation, before conv_pwl
        blk = bb.blocks[cut.stage][cut.block]
        h = blk.se(blk.aa(blk.bn2(blk.conv_dw(blk.bn1(blk.conv_pw(h))))))
    return h.contiguous()


@torch.inference_mode()
def trunk(encoder, cut: Cut, x: torch.Tensor) -> torch.Tensor:
    """Frozen activations at ``cut`` for uint8 patches (B, 3, px, px); ``"input"`` returns ``x``."""
    if cut.input:
        return x
    h = encoder.preprocess(x)
    return (_vit_trunk if cut.arch == "vit" else _effnet_trunk)(encoder.backbone, cut, h)


class Tail(nn.Module):
    """Runs the encoder from the cut to its pooled (B, dim) features. Frozen layers stay in eval mode."""

    def __init__(self, encoder, cut: Cut):
        super().__init__()
        self.encoder = encoder
        self.cut = cut

    def train(self, mode: bool = True):  # BatchNorm statistics and dropout of the frozen encoder stay fixed
        super().train(mode)
        self.encoder.eval()
        return self

    def _vit(self, h: torch.Tensor) -> torch.Tensor:
        enc, bb = self.encoder, self.encoder.backbone
        for i in range(self.cut.stage, len(bb.blocks)):
            h = bb.blocks[i](h)
        h = bb.norm(h)
        if enc.spec.pooling == "cls+mean_patch":
            n_prefix = int(getattr(bb, "num_prefix_tokens", 1))
            return torch.cat([h[:, 0], h[:, n_prefix:].mean(dim=1)], dim=-1)
        return bb.forward_head(h, pre_logits=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        enc, cut = self.encoder, self.cut
        bb = enc.backbone
        if cut.input:
            return enc.features(enc.preprocess(h))
        if cut.arch == "vit":
            return self._vit(h)
        if cut.inner:
            blk = bb.blocks[cut.stage][cut.block]
            h = blk.bn3(blk.conv_pwl(h))
        for _, blk in tail_blocks(bb, cut):
            h = blk(h)
        h = bb.bn2(bb.conv_head(h))
        return bb.forward_head(h, pre_logits=True) if hasattr(bb, "forward_head") else bb.global_pool(h).flatten(1)


def dihedral(x: torch.Tensor, v: int) -> torch.Tensor:
    """The v-th of the 8 dihedral transforms of (B, 3, H, W) patches (0 = identity)."""
    if v >= 4:
        x = x.flip(-1)
    return torch.rot90(x, v % 4, dims=(-2, -1))


# ================================================================================ the cache
class _LRU:
    """Per-section trunk activations kept in memory, least recently used dropped past ``budget`` bytes."""

    def __init__(self):
        self._d: OrderedDict[str, torch.Tensor] = OrderedDict()

    @staticmethod
    def budget() -> int:
        return env_bytes("STDISTILL_TRUNK_MEMORY_GB", 4, 2**30)

    def get(self, key: str) -> torch.Tensor | None:
        t = self._d.get(key)
        if t is not None:
            self._d.move_to_end(key)
        return t

    def put(self, key: str, t: torch.Tensor) -> None:
        self._d[key] = t
        self._d.move_to_end(key)
        budget = self.budget()
        while len(self._d) > 1 and self.nbytes > budget:
            self._d.popitem(last=False)
        if self.nbytes > budget:  # a single section larger than the budget is not kept
            self._d.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._d.values())

    def clear(self) -> None:
        self._d.clear()


_MEMORY = _LRU()


def clear_trunk_cache() -> None:
    """Empty the in-memory trunk cache (the disk cache is kept)."""
    _MEMORY.clear()


def _default_cache_root() -> Path:
    env = os.environ.get("STDISTILL_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "stdistill") / "peka_trunk"


def _section_image_digest(adata: ad.AnnData, s: str) -> str:
    lib = library(adata, s)
    if "fullres" in lib.get("images", {}):
        return array_digest(np.asarray(lib["images"]["fullres"]))
    return file_digest(lib["metadata"]["source_image_path"])


def _section_key(encoder, adata: ad.AnnData, s: str, m: np.ndarray, cut: Cut, cfg: AdapterConfig,
                 stain: StainNormalizer | None = None) -> str:
    # the section's own stain estimate is a function of its image, spots and patch geometry (all in
    # the key), so only the method and the reference are added, and only when normalising (the keys
    # of raw patches are those from before stain normalisation existed)
    extra = {} if stain is None else {"stain": stain.method, "stain_ref": stain.reference, "stain_n": STAIN_SAMPLE}
    return array_digest(np.frombuffer(json.dumps({
        "enc": encoder.spec.name, "w": encoder.weights_digest, "cut": str(cut), "size_um": cfg.size_um, "px": cfg.px,
        "views": cfg.views, "img": _section_image_digest(adata, s),
        "xy": array_digest(np.asarray(adata.obsm[SPATIAL_KEY][m], dtype=np.float64)),
        "mpp": library(adata, s)["scalefactors"].get("microns_per_pixel"), **extra,
    }, sort_keys=True).encode(), dtype=np.uint8))


def stain_reference(adata: ad.AnnData, cfg: AdapterConfig) -> tuple[StainNormalizer, str] | None:
    """The stain reference of ``cfg`` on training sections ``adata``: ``(normalizer, section)``, a
    :class:`~stdistill.pp.StainNormalizer` fitted to section ``cfg.stain_reference`` (default: the
    first imaged one) from up to :data:`STAIN_SAMPLE` of its ``cfg.size_um`` patches, as
    :func:`stdistill.features.stain_estimates` does. None when ``cfg.stain_norm`` is None. Pass the
    normalizer to :func:`trunk_activations` (``stain=``)."""
    from ..features.extract import stain_estimates
    from ..io import has_image, subset_sections
    from ..pp._stain import StainNormalizer

    if cfg.stain_norm is None:
        return None
    imaged = [s for s in _sections(adata) if has_image(adata, s)]
    ref = cfg.stain_reference if cfg.stain_reference is not None else (imaged[0] if imaged else None)
    if ref not in imaged:
        raise StdistillError(f"stain_reference {ref!r} is not an imaged training section ({imaged})")
    est = stain_estimates(subset_sections(adata, [ref]), cfg.stain_norm, size_um=cfg.size_um, px=cfg.px,
                          n_sample=STAIN_SAMPLE)[ref]
    return StainNormalizer(cfg.stain_norm, est), ref


def _stain_transform(sub: ad.AnnData, cfg: AdapterConfig, stain: StainNormalizer | None):
    """The :class:`~stdistill.pp.PatchDataset` transform mapping ``sub``'s patches onto ``stain``'s
    reference, each section with its own estimate (as :func:`stdistill.features.extract` makes it)."""
    if stain is None:
        return None
    from ..features.extract import stain_estimates
    from ..pp._stain import SectionStainTransform

    sources = stain_estimates(sub, stain.method, size_um=cfg.size_um, px=cfg.px, n_sample=STAIN_SAMPLE)
    return SectionStainTransform(stain, sources, sub.obs[SECTION_KEY].astype(str).to_numpy())


def _read_disk(path: Path | None, n: int) -> torch.Tensor | None:
    if path is None or not path.is_file():
        return None
    try:
        t = torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError):
        return None
    return t if t.shape[0] == n else None


def _compute(encoder, sub: ad.AnnData, cut: Cut, cfg: AdapterConfig, batch_size: int, device: str,
             stain: StainNormalizer | None = None) -> torch.Tensor:
    from ..pp.patches import PatchDataset

    # stain-normalised per patch when read, so the dihedral views below are of normalised patches
    ds = PatchDataset(sub, size_um=cfg.size_um, px=cfg.px, transform=_stain_transform(sub, cfg, stain))
    out, i = None, 0  # written batch by batch into one preallocated tensor (no concatenated copy)
    encoder.to(device)
    for xb, _ in ds.loader(batch_size=batch_size):
        vs = torch.stack([trunk(encoder, cut, dihedral(xb, v).to(device)).cpu() for v in range(cfg.views)], 1)
        vs = vs if cut.input else vs.to(torch.float16)
        if out is None:
            out = torch.empty((sub.n_obs, *vs.shape[1:]), dtype=vs.dtype)
        out[i:i + len(vs)] = vs
        i += len(vs)
    return out


class SectionActivations:
    """Trunk activations read from the per-section ``.npy`` files of the disk cache (memory-mapped)
    when indexed: the whole (n_spots, views, *shape) array is never resident.

    Indexed like the tensor :func:`trunk_activations` returns otherwise: ``h[rows]`` or
    ``h[rows, ...]`` with an int, a slice, or an index array / tensor of rows; returns a torch
    tensor. ``len(h)``, ``h.shape`` and ``h.dtype`` as for a tensor; :meth:`digest` names the
    content (the sections' cache keys and the row layout) without reading it.
    """

    def __init__(self, paths: list[Path], rows: list[np.ndarray], n: int):
        self.paths = [str(p) for p in paths]
        self._sec = np.empty(n, dtype=np.int64)  # row -> section number, and row within it
        self._loc = np.empty(n, dtype=np.int64)
        for k, r in enumerate(rows):
            self._sec[r], self._loc[r] = k, np.arange(len(r))
        first = np.load(self.paths[0], mmap_mode="r")
        self._np_dtype = first.dtype
        self.shape = (n, *first.shape[1:])
        self.dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype
        self._maps = None

    def __getstate__(self):  # memory maps are reopened after unpickling
        return {k: v for k, v in self.__dict__.items() if k != "_maps"} | {"_maps": None}

    def __len__(self) -> int:
        return self.shape[0]

    def digest(self) -> str:
        return array_digest(np.frombuffer(json.dumps([Path(p).name for p in self.paths]).encode(), dtype=np.uint8)
                            ) + array_digest(self._sec) + array_digest(self._loc)

    def __getitem__(self, key) -> torch.Tensor:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        idx = np.arange(len(self))[rows]
        single = np.ndim(idx) == 0
        idx = np.atleast_1d(idx)
        if self._maps is None:
            self._maps = [np.load(p, mmap_mode="r") for p in self.paths]
        out = np.empty((len(idx), *self.shape[1:]), dtype=self._np_dtype)
        sec = self._sec[idx]
        for k in np.unique(sec):
            m = sec == k
            out[m] = self._maps[k][self._loc[idx[m]]]  # reads only these rows
        t = torch.from_numpy(out)
        return t[(0, *rest)] if single else t[(slice(None), *rest)]


def trunk_activations(
    encoder, adata: ad.AnnData, cfg: AdapterConfig, *, cache_dir: str | os.PathLike | bool | None = None,
    batch_size: int = 64, device: str = "cpu", lazy: bool | str = False, stain: StainNormalizer | None = None,
) -> torch.Tensor | SectionActivations:
    """``(n_spots, views, *shape)`` float16 frozen activations at ``cfg.train_from`` (uint8 patches for ``"input"``).

    Computed once per section and kept on disk (``cache_dir``; ``None``:
    ``$STDISTILL_CACHE/peka_trunk`` or ``~/.cache/stdistill/peka_trunk``; ``False``: no disk) and in
    a bounded in-memory cache (least recently used sections dropped past
    ``$STDISTILL_TRUNK_MEMORY_GB``, default 4; skipped when the requested activations alone
    exceed that budget, so the peak memory is the output plus one section), keyed by the encoder's
    weights digest, the cut, the patch geometry, the image's and the spot coordinates' digests (and,
    with ``stain``, its method and reference).

    ``stain``: a fitted :class:`~stdistill.pp.StainNormalizer`; every patch is first mapped onto its
    reference, with its section's stain estimated from up to 64 of the section's patches (as
    :func:`stdistill.features.extract` does). None: raw patches.

    ``lazy=True``: return a :class:`SectionActivations` reading the disk cache's files when
    indexed instead of one tensor (needs the disk cache); ``"auto"``: so only when the
    activations exceed the memory budget and the disk cache is on.
    """
    cut = parse_cut(encoder.backbone, cfg.train_from)
    root = None if cache_dir is False else (Path(cache_dir) if cache_dir not in (None, True) else _default_cache_root())
    if lazy is True and root is None:
        raise StdistillError("lazy trunk activations are read from the disk cache: pass cache_dir= other than False")
    sec_of = adata.obs[SECTION_KEY].astype(str).to_numpy()
    out = None  # each section is written into the output as soon as it is read or computed
    keep = True  # sections go to the in-memory cache only when the whole output fits its budget
    rows, paths = [], []
    for s in _sections(adata):
        m = np.flatnonzero(sec_of == s)
        key = _section_key(encoder, adata, s, m, cut, cfg, stain)
        path = root / f"{key}.npy" if root is not None else None
        rows.append(m)
        paths.append(path)
        if lazy is True or (out is None and lazy == "auto" and root is not None):
            per_spot = _on_disk(path, len(m), lambda: _compute(encoder, adata[m], cut, cfg, batch_size, device, stain))
            if lazy is True or per_spot * adata.n_obs > _LRU.budget():
                lazy = True
                continue
            lazy = False
        t = _MEMORY.get(key)
        if t is None:
            t = _read_disk(path, len(m))
        if t is None:
            t = _compute(encoder, adata[m], cut, cfg, batch_size, device, stain)
            if path is not None:
                _write(path, t)
        if out is None:
            out = torch.empty((adata.n_obs, *t.shape[1:]), dtype=t.dtype)
            keep = out.numel() * out.element_size() <= _LRU.budget()
        if keep:  # else holding sections beside the output would only double the peak memory
            _MEMORY.put(key, t)
        out[torch.from_numpy(m)] = t
        del t  # past the memory budget the section is freed now, not at the end
    return SectionActivations(paths, rows, adata.n_obs) if lazy is True else out


def _write(path: Path, t: torch.Tensor) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, t.numpy(), allow_pickle=False)


def _on_disk(path: Path, n: int, compute) -> int:
    """Bytes per spot of the section's cache file, written first (``compute()``) when missing or unreadable."""
    try:
        a = np.load(path, mmap_mode="r")
        if a.shape[0] == n:
            return a[:1].nbytes
    except (OSError, ValueError):
        pass
    t = compute()
    _write(path, t)
    return t[:1].numel() * t.element_size()
