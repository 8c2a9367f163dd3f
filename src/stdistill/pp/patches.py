"""Image patches centred on spots, at a physical size whatever the scan's resolution."""

from __future__ import annotations

import anndata as ad
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .._errors import StdistillError
from ..io._section import SECTION_KEY, SPATIAL_KEY, has_image, image, microns_per_pixel, sections
from .._keys import Key


def _crop_box(x: float, y: float, side_px: float) -> tuple[int, int, int]:
    """Integer (x0, y0, side) of a square of ``side_px`` full-resolution pixels centred on (x, y)."""
    side = max(1, int(round(side_px)))
    return int(round(x - side / 2)), int(round(y - side / 2)), side


class PatchDataset(Dataset):
    """Square patches of ``size_um`` micrometres centred on each spot, resampled to ``px`` pixels.

    Item ``i`` is ``(patch, i)``: ``patch`` a uint8 tensor (3, px, px), RGB, not normalised
    (encoders normalise on the device). Parts of a patch outside the image are white and
    flagged in :attr:`padded`. Works on one or many sections (``obs["section"]``).

    Parameters
    ----------
    adata
        Sections in the stdistill layout, each with an image.
    size_um
        Patch side in micrometres (HEST: 112 um = 224 px at 0.5 um/px).
    px
        Patch side in output pixels.
    transform
        Optional ``transform(patch, i) -> patch`` on the uint8 (3, px, px) tensor of item ``i``
        (e.g. stain normalisation, augmentation); picklable when DataLoader workers are used.
    """

    def __init__(self, adata: ad.AnnData, size_um: float = 112.0, px: int = 224, transform=None):
        if size_um <= 0 or px <= 0:
            raise StdistillError(f"patch size must be positive, got size_um={size_um}, px={px}")
        self.size_um, self.px = float(size_um), int(px)
        self.transform = transform
        secs = sections(adata)
        missing = [s for s in secs if not has_image(adata, s)]
        if missing:
            raise StdistillError(f"sections without an H&E image cannot be patched: {missing}")
        self._sec_of = adata.obs[SECTION_KEY].astype(str).to_numpy()
        self._xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
        self._mpp = {s: microns_per_pixel(adata, s) for s in secs}
        self._adata = adata
        self._readers: dict = {}
        sizes = {s: image(adata, s).size for s in secs}
        side = np.array([self.size_um / self._mpp[s] for s in self._sec_of])
        w = np.array([sizes[s][0] for s in self._sec_of])
        h = np.array([sizes[s][1] for s in self._sec_of])
        x0 = np.round(self._xy[:, 0] - np.round(side) / 2)
        y0 = np.round(self._xy[:, 1] - np.round(side) / 2)
        #: (n,) bool: the patch reaches beyond its image's edge (padded with white)
        self.padded = (x0 < 0) | (y0 < 0) | (x0 + np.round(side) > w) | (y0 + np.round(side) > h)

    def __len__(self) -> int:
        return len(self._sec_of)

    def _reader(self, s: str):
        if s not in self._readers:  # opened per worker process
            self._readers[s] = image(self._adata, s)
        return self._readers[s]

    def read(self, i: int) -> np.ndarray:
        """Patch ``i`` as an RGB uint8 array (px, px, 3)."""
        s = self._sec_of[i]
        x0, y0, side = _crop_box(*self._xy[i], self.size_um / self._mpp[s])
        region = self._reader(s).read_region(x0, y0, side, side)
        if side != self.px:
            region = np.asarray(Image.fromarray(region).resize((self.px, self.px), Image.BILINEAR, reducing_gap=2.0))
        return region

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.ascontiguousarray(self.read(i).transpose(2, 0, 1)))
        return (x if self.transform is None else self.transform(x, i)), i

    def loader(self, batch_size: int = 64, num_workers: int = 0, indices=None) -> DataLoader:
        """A DataLoader over all patches (or ``indices``), in order."""
        ds = self if indices is None else torch.utils.data.Subset(self, list(indices))
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          persistent_workers=False, pin_memory=False)


def patches(adata: ad.AnnData, size_um: float = 112.0, px: int = 224, key_added: str | None = Key.obs.patch_padded) -> PatchDataset:
    """Patch dataset of ``adata``'s spots (see :class:`PatchDataset`).

    Writes ``obs[key_added]`` (bool): the patch reaches beyond the image edge and was padded.
    """
    ds = PatchDataset(adata, size_um=size_um, px=px)
    if key_added:
        adata.obs[key_added] = ds.padded
    return ds
