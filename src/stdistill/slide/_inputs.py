"""What a slide run is given, checked before any work: the slide (a file, an open reader, a
LazySlide ``WSIData``), its physical scale, and the output folder."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._errors import StdistillError

#: plausible microns per pixel of an H&E scan (a 40x scan is about 0.25, 20x 0.5, 10x 1, 5x 2)
MPP_RANGE = (0.1, 10.0)
#: fewest pixels along a tile's side in the scan
MIN_TILE_PX = 16


@dataclass
class SlideSource:
    """A slide ready to tile: its reader (for this process), output name, the file it was read
    from (None for an in-memory image) and the microns per pixel its metadata records."""

    reader: object
    name: str
    path: Path | None
    mpp: float | None
    wsi: object = None  # a wsidata.WSIData the predictions are written into

    def label(self) -> str:
        return str(self.path) if self.path else f"slide {self.name!r}"

    def digest(self) -> str:
        from .._utils import file_digest

        return file_digest(self.path) if self.path else self.reader.digest()


def is_wsidata(obj) -> bool:
    """``obj`` is a LazySlide ``wsidata.WSIData`` (only checked when wsidata is imported)."""
    mod = sys.modules.get("wsidata")
    return mod is not None and isinstance(obj, mod.WSIData)


def open_source(slide, name: str | None = None) -> SlideSource:
    """A :class:`SlideSource` from a path, an :class:`~stdistill.io.ImageReader`, an open
    ``tiffslide.TiffSlide``/``openslide.OpenSlide``, an RGB array or a ``wsidata.WSIData``."""
    from ..io._image import ArrayImage, SlideImage, open_image
    from ..pp.tile import slide_mpp

    if isinstance(slide, (str, os.PathLike)):
        reader = open_image(slide)
    elif is_wsidata(slide):
        from ._wsidata import WSIDataReader

        reader = WSIDataReader(slide.reader)
        return SlideSource(reader, name or Path(reader.path).stem, Path(reader.path), slide.properties.mpp, wsi=slide)
    elif hasattr(slide, "read_region") and hasattr(slide, "thumbnail") and hasattr(slide, "size"):
        reader = slide
    elif hasattr(slide, "read_region") and hasattr(slide, "dimensions"):
        reader = SlideImage.from_handle(slide)
    elif isinstance(slide, np.ndarray):
        reader = ArrayImage(slide)
    else:
        raise StdistillError(f"slide must be a file path, an image reader, an open TiffSlide/OpenSlide, an RGB array or "
                             f"a wsidata.WSIData, got {type(slide).__name__}")
    path = Path(reader.path) if getattr(reader, "path", None) else None
    if path is None and not hasattr(reader, "array"):
        raise StdistillError(f"a {type(reader).__name__} reader with no file path must hold its pixels in .array")
    return SlideSource(reader, name or (path.stem if path else "slide"), path, slide_mpp(reader))


def check_scale(src: SlideSource, mpp: float | None, size_um: float, force: bool) -> float:
    """The microns per pixel to tile with (``mpp`` or the slide's own), refused in one line when
    missing, not a positive number, or implausible for an H&E scan (outside :data:`MPP_RANGE`,
    or a tile side under :data:`MIN_TILE_PX` pixels) unless ``force``."""
    where = "--mpp"
    if mpp is not None:
        if not np.isfinite(mpp) or mpp <= 0:
            raise StdistillError(f"--mpp must be a positive number of micrometres per pixel, got {mpp:g}", src.label())
        um = float(mpp)
    elif src.mpp is None or not np.isfinite(src.mpp) or src.mpp <= 0:
        raise StdistillError("the slide records no microns per pixel; pass --mpp (e.g. 0.5 for a 20x scan)", src.label())
    else:
        um, where = float(src.mpp), "the slide's metadata"
    if force:
        return um
    lo, hi = MPP_RANGE
    if not lo <= um <= hi:
        raise StdistillError(f"{where} gives {um:g} um per pixel, implausible for an H&E scan (expected {lo:g}-{hi:g}; "
                             f"a 20x scan is about 0.5, 40x about 0.25); check it, or pass --force if it is right",
                             src.label())
    if size_um / um < MIN_TILE_PX:
        raise StdistillError(f"at {um:g} um per pixel a {size_um:g} um tile is {size_um / um:.1f} px, under "
                             f"{MIN_TILE_PX} px; check --mpp, or pass --force if it is right", src.label())
    return um


def check_out(out: Path) -> None:
    """The output folder may exist (a run to resume) but must not be a file."""
    if out.exists() and not out.is_dir():
        raise StdistillError("--out is an existing file; give a folder (it will hold the maps, the .h5ad, the "
                             "GeoJSON and run.json)", out)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StdistillError(f"--out lies under {parent}, which is a file", out)
            break
