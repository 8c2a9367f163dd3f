"""Stain and geometry augmentation of H&E patches, reproducible per (seed, spot, view).

Each augmented view of a patch draws its random numbers from its own generator, seeded by
(seed, spot name, view index): a view is the same whatever the batch size, the worker count
or which other spots are encoded with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import StdistillError


def _hed_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    from skimage.color import hed_from_rgb, rgb_from_hed

    return torch.tensor(rgb_from_hed, dtype=torch.float32), torch.tensor(hed_from_rgb, dtype=torch.float32)


def view_generator(seed: int, key: str, view: int) -> torch.Generator:
    """A CPU generator seeded by (``seed``, ``key`` e.g. a spot name, ``view``)."""
    h = hashlib.blake2b(f"{int(seed)}/{key}/{int(view)}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class PatchAugment:
    """Random stain and geometry changes of one uint8 patch (3, H, W); sizes in pixels.

    Parameters
    ----------
    hed
        HED jitter: each stain channel's optical density (colour deconvolution, Ruifrok &
        Johnston matrix) scaled by U(1 - hed, 1 + hed) and shifted by U(-hed, hed) / 10.
    brightness, contrast
        Factors drawn from U(1 - x, 1 + x) (contrast about the patch mean).
    dihedral
        A random one of the 8 rotations by 90 degrees / flips.
    scale
        Zoom by a factor in U(1 - scale, 1 + scale) about the centre (out: white border),
        output size unchanged.
    """

    hed: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    dihedral: bool = True
    scale: float = 0.1

    def __post_init__(self):
        for k in ("hed", "brightness", "contrast", "scale"):
            v = getattr(self, k)
            if not 0 <= v < 1:
                raise StdistillError(f"PatchAugment.{k} must be in [0, 1), got {v}")

    def params(self) -> dict:
        """The settings (JSON-able; part of cache keys)."""
        return asdict(self)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 (3, H, W) -> uint8 (3, H, W), drawing from generator ``g``."""
        if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
            raise StdistillError(f"PatchAugment takes a uint8 (3, H, W) patch, got {x.dtype} {tuple(x.shape)}")
        u = torch.rand(11, generator=g)  # always draw the same count: views stay aligned across settings
        y = x.float()
        if self.hed:
            y = self._hed(y, 1 + self.hed * (2 * u[0:3] - 1), self.hed / 10 * (2 * u[3:6] - 1))
        if self.brightness or self.contrast:
            b = 1 + self.brightness * (2 * u[6] - 1)
            c = 1 + self.contrast * (2 * u[7] - 1)
            y = ((y - y.mean()) * c + y.mean()) * b
        y = y.clamp(0, 255)
        if self.scale:
            y = _zoom(y, float(1 + self.scale * (2 * u[8] - 1)))
        if self.dihedral:
            y = torch.rot90(y, int(u[9] * 4) % 4, dims=(1, 2))
            if u[10] < 0.5:
                y = y.flip(2)
        return y.round().clamp(0, 255).to(torch.uint8)

    @staticmethod
    def _hed(y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        rgb_from_hed, hed_from_rgb = _hed_matrices()
        c, h, w = y.shape
        od = -torch.log((y.reshape(3, -1) + 1.0) / 256.0)  # (3, HW) optical density
        hed = hed_from_rgb.T @ od
        hed = hed * alpha[:, None] + beta[:, None]
        return (256.0 * torch.exp(-(rgb_from_hed.T @ hed)) - 1.0).reshape(c, h, w)


def _zoom(y: torch.Tensor, f: float) -> torch.Tensor:
    """Zoom float (3, H, W) by ``f`` about the centre; pixels from outside are white."""
    _, h, w = y.shape
    theta = torch.tensor([[1.0 / f, 0.0, 0.0], [0.0, 1.0 / f, 0.0]]).unsqueeze(0)
    grid = F.affine_grid(theta, [1, 3, h, w], align_corners=False)
    out = F.grid_sample(y.unsqueeze(0) - 255.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0] + 255.0


class ViewTransform:
    """Picklable patch transform of :class:`~stdistill.pp.PatchDataset`: an optional stain
    transform, then view ``view`` of :class:`PatchAugment` seeded by (seed, spot name, view)."""

    def __init__(self, augment: PatchAugment, seed: int, names: np.ndarray, view: int, before=None):
        self.augment, self.seed, self.names, self.view, self.before = augment, int(seed), np.asarray(names), int(view), before

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.before is not None:
            x = self.before(x, i)
        return self.augment(x, view_generator(self.seed, str(self.names[i]), self.view))
