"""What a slide file holds before any pixel is read: its pixel layout (bit depth, colour mode) and
whether its image data is all there; and the log noise of the reading libraries, kept in scope.

Whole-slide archives hold files that the readers answer with pages of tracebacks: interrupted
copies (truncated TIFFs), 16-bit or CMYK scans, greyscale exports. :func:`tiff_layout` names
each in one line before any work starts, or says how its pixels are converted to 8-bit RGB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._errors import StdistillError

#: loggers of the libraries under the slide readers (tifffile, zarr's event loop, codecs)
_NOISY = ("tifffile", "tiffslide", "zarr", "asyncio", "imagecodecs", "numcodecs", "fsspec", "openslide")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class UnreadableRegion(StdistillError):
    """A region of a readable slide that cannot be decoded (a damaged tile)."""


class _Kept(logging.Handler):
    """Keeps the records of the reading libraries (the last few) instead of printing them."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 50:
            self.messages.append(record.getMessage())


_lock = threading.Lock()
_depth = 0
_kept = _Kept()
_saved: list[tuple[logging.Logger, bool]] = []


@contextlib.contextmanager
def quiet_readers():
    """Inside the block, what tifffile, zarr, asyncio and the codecs log is kept in a list (yielded)
    instead of printed; outside it nothing changes. Re-entrant and thread-safe: the first entry
    installs the handler, the last exit restores the loggers as they were."""
    global _depth
    with _lock:
        if _depth == 0:
            _kept.messages = []
            for name in _NOISY:
                lg = logging.getLogger(name)
                _saved.append((lg, lg.propagate))
                lg.addHandler(_kept)
                lg.propagate = False
        _depth += 1
    try:
        yield _kept.messages
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for lg, propagate in _saved:
                    lg.removeHandler(_kept)
                    lg.propagate = propagate
                _saved.clear()


def reader_failure(e: BaseException) -> str:
    """``"TypeName: message"`` of a reading library's exception, on one line."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


@dataclass(frozen=True)
class PixelLayout:
    """How a slide stores its pixels: ``"rgb"`` (8-bit RGB/YCbCr, read as is), ``"rgba"`` (alpha
    composited onto white), ``"rgb16"`` (16-bit RGB, scaled to 8 bits: value / 257), ``"cmyk"``
    (converted to RGB), ``"palette"`` (mapped through its colour table)."""

    kind: str = "rgb"
    colormap: np.ndarray | None = None  # (256, 3) uint8 for "palette"

    @property
    def native(self) -> bool:
        return self.kind == "rgb"


def is_tiff(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def _data_end(page) -> int:
    """The last byte of ``page``'s image data (0 for a page without data)."""
    ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts) if c]
    return max(ends, default=0)


def _pages(tf):
    """Every page of every series and pyramid level (main IFD chain and SubIFDs)."""
    for s in tf.series:
        for level in getattr(s, "levels", [s]):
            yield from (p for p in level.pages if p is not None)


def _check_complete(tf, path: Path, messages: list[str]) -> None:
    """Refuse a file whose IFD chain or image data runs past its end (an interrupted copy)."""
    size = path.stat().st_size
    end = max((_data_end(p) for p in _pages(tf)), default=0)
    broken = [m for m in messages if "invalid page offset" in m or "corrupted" in m or "truncated" in m.lower()]
    if end > size or broken:
        reach = f" but its image data reaches {end:,} bytes" if end > size else f" and its page list is broken ({broken[0]})"
        raise StdistillError(f"the file is truncated: it ends at {size:,} bytes{reach}; an interrupted copy? "
                             "copy it again", path)


def _layout_of(page, path: Path) -> PixelLayout:
    """The :class:`PixelLayout` of a TIFF page; one line for what cannot be made RGB."""
    photometric = getattr(page.photometric, "name", str(page.photometric))
    spp, dtype = int(page.samplesperpixel), np.dtype(page.dtype) if page.dtype is not None else None
    bits = f"{dtype.itemsize * 8}-bit" if dtype is not None else "unknown bit depth"
    if photometric in ("MINISBLACK", "MINISWHITE") and spp <= 2:
        raise StdistillError(f"greyscale image ({bits}); an H&E slide is read in colour (tissue detection and "
                             "encoders need the stains): export it as RGB", path)
    if dtype is None or dtype.kind != "u":
        what = {"f": "floating-point", "i": "signed integer", "b": "boolean", "c": "complex"}.get(getattr(dtype, "kind", ""), "")
        raise StdistillError(f"{bits} {what} samples; stdistill reads 8- or 16-bit unsigned RGB: convert the image", path)
    if dtype.itemsize > 2:
        raise StdistillError(f"{bits} samples; stdistill reads 8- or 16-bit RGB: convert the image", path)
    if photometric == "PALETTE":
        cmap = np.asarray(page.colormap)
        cmap = (cmap >> 8 if cmap.max() > 255 else cmap).astype(np.uint8).T  # (256, 3)
        return PixelLayout("palette", cmap)
    if photometric == "SEPARATED" and spp == 4:
        return PixelLayout("cmyk")
    if photometric in ("RGB", "YCBCR") and spp in (3, 4):
        if dtype.itemsize == 2:
            return PixelLayout("rgb16")
        return PixelLayout("rgba" if spp == 4 else "rgb")
    raise StdistillError(f"{photometric} image with {spp} channels ({bits}); stdistill reads RGB H&E slides", path)


def tiff_layout(path: str | os.PathLike) -> PixelLayout | None:
    """The pixel layout of a TIFF-based slide (TIFF, OME-TIFF, SVS, NDPI, ...), after checking that
    its image data is complete; None for files that are not TIFFs (the slide reader decides).
    Raises :class:`StdistillError` naming the file for a truncated file, a greyscale, float or
    multi-channel image."""
    import tifffile

    path = Path(path)
    if not is_tiff(path):
        return None
    with quiet_readers() as messages:
        try:
            with tifffile.TiffFile(path) as tf:
                _check_complete(tf, path, messages)
                return _layout_of(tf.series[0].levels[0].keyframe, path)
        except StdistillError:
            raise
        except Exception as e:  # noqa: BLE001 - tifffile raises many types for damaged files
            raise StdistillError(f"the TIFF structure is damaged ({reader_failure(e)})", path) from None


def to_rgb8(arr: np.ndarray, layout: PixelLayout) -> np.ndarray:
    """(h, w, 3) uint8 RGB from a region as the file stores it (see :class:`PixelLayout`)."""
    arr = np.asarray(arr)
    if layout.kind == "palette":
        return layout.colormap[arr[..., 0] if arr.ndim == 3 else arr]
    if layout.kind == "cmyk":
        from PIL import Image

        return np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., :4]), "CMYK").convert("RGB"))
    if layout.kind == "rgb16":
        arr = np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)
    if arr.shape[-1] == 4:
        return over_white(arr)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8, copy=False))


def over_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8: an RGBA region composited onto white (transparent = glass)."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.round(rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)
