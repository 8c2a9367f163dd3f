"""Patch pixels for GenST's end-to-end histology VQ-VAE (``GenstConfig(histology="pixels")``).

Patches come from :class:`stdistill.pp.PatchDataset` (``size_um`` micrometres centred on each spot,
resampled to ``px`` pixels, whatever the scan's resolution). :func:`genst_patches` reads them once
into ``obsm["genst_patches"]`` (uint8, (n_spots, 3, px, px)) so that repeated fits (settings chosen
on inner patients) do not read the slides again; without it, every fit reads them from the images.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import torch

from ..._api import deliver
from ..._errors import StdistillError
from ..._keys import Key

__all__ = ["PATCH_KEY", "genst_patches", "patch_pixels", "channel_stats", "scale_pixels", "augment_pixels"]

#: ``obsm`` key of cached patches (``uns[PATCH_KEY]`` holds their ``size_um`` and ``px``)
PATCH_KEY = Key.obsm.genst_patches


def read_patches(adata: ad.AnnData, size_um: float, px: int) -> np.ndarray:
    """(n_spots, 3, px, px) uint8 RGB patches of ``adata``'s spots from its H&E images."""
    from ...pp.patches import PatchDataset

    ds = PatchDataset(adata, size_um=size_um, px=px)
    out = np.empty((adata.n_obs, 3, px, px), np.uint8)
    for x, i in ds.loader(batch_size=256):
        out[i.numpy()] = x.numpy()
    return out


def genst_patches(adata: ad.AnnData, size_um: float = 112.0, px: int = 64, *, key_added: str = PATCH_KEY,
                  copy: bool = False) -> ad.AnnData | None:
    """Read every spot's ``size_um`` patch at ``px`` pixels into ``obsm[key_added]`` (uint8 (n, 3, px, px))
    and record ``{"size_um", "px"}`` in ``uns[key_added]``; GenST with ``histology="pixels"`` reads them
    from there (same ``patch_um``/``patch_px``) instead of from the images. Returns None
    (``copy=True``: a new AnnData with them)."""
    patches = read_patches(adata, size_um, px)

    def write(target: ad.AnnData) -> None:
        target.obsm[key_added] = patches
        target.uns[key_added] = {"size_um": float(size_um), "px": int(px)}

    return deliver(adata, patches, write, copy=copy)


def patch_pixels(adata: ad.AnnData, size_um: float, px: int, key: str = PATCH_KEY) -> np.ndarray:
    """(n, 3, px, px) uint8 patches: the cached ``obsm[key]`` when its size matches, else read from the images."""
    meta = adata.uns.get(key) or {}
    cached = adata.obsm[key] if key in adata.obsm else None
    if cached is not None and np.shape(cached) == (adata.n_obs, 3, px, px) and \
            float(meta.get("size_um", size_um)) == float(size_um) and int(meta.get("px", px)) == int(px):
        return np.asarray(cached, dtype=np.uint8)
    from ...io._section import has_image, sections

    def imaged(s: str) -> bool:
        try:
            return has_image(adata, s)
        except StdistillError:  # no uns["spatial"] entry for the section
            return False

    if adata.n_obs and not all(imaged(s) for s in sections(adata)):
        raise StdistillError(f"GenST with histology='pixels' needs each section's H&E image (or obsm['{key}'] of "
                             f"{size_um:g} um patches at {px} px from stdistill.recipes.genst_patches)")
    return read_patches(adata, size_um, px)


def channel_stats(u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and SD (3,) of (n, 3, px, px) uint8 patches on the [0, 1] scale."""
    x = u8.astype(np.float32).transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    return x.mean(1).astype(np.float32), np.maximum(x.std(1), 1e-3).astype(np.float32)


def scale_pixels(u8: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> torch.Tensor:
    """(n, 3, px, px) uint8 -> float32 tensor standardised per channel with the training patches' ``mean``/``sd``."""
    x = torch.from_numpy(np.ascontiguousarray(u8)).float().div_(255.0)
    return (x - torch.from_numpy(mean).view(1, 3, 1, 1)) / torch.from_numpy(sd).view(1, 3, 1, 1)


def augment_pixels(x: torch.Tensor, g: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """A random one of the 8 rotations by 90 degrees / flips per patch of (B, 3, px, px) ``x``, and
    per-channel intensity jitter (scale U(1 - jitter, 1 + jitter), shift U(-jitter, jitter) on the
    standardised scale), drawn from generator ``g``."""
    n = len(x)
    k = torch.randint(0, 8, (n,), generator=g)
    out = torch.empty_like(x)
    for t in range(8):
        m = k == t
        if m.any():
            y = torch.rot90(x[m], t % 4, dims=(2, 3))
            out[m] = y.flip(3) if t >= 4 else y
    scale = 1 + jitter * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    shift = jitter * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    return out * scale + shift
