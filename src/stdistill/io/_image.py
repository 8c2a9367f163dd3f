"""Lazy readers of full-resolution H&E images.

A reader never holds a whole slide unless the file format forces it (plain JPEG/PNG are
decoded once, on the first region read). Pyramidal TIFF/SVS/NDPI go through tiffslide
(``pip install stdistill[wsi]``), and what tiffslide cannot open (MRXS, ...) through openslide
(``stdistill[openslide]``); plain TIFF through tifffile when neither is installed.
Coordinates are full-resolution pixels, (x, y) = (column, row).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from .._errors import StdistillError, require_file
from .._utils import array_digest, file_digest

PAD_VALUE = 255  # white, like glass background
_WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".tif", ".tiff"}


class ImageReader(Protocol):
    """What every reader offers."""

    path: str | None
    size: tuple[int, int]  # (width, height) in full-resolution pixels

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 array (h, w, 3); parts outside the image are filled with white."""

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """Downscaled RGB uint8 image whose longer side is <= ``max_size``, and its scale."""

    def digest(self) -> str:
        """Content digest (file bytes or array bytes), for cache keys."""


def _paste(region: np.ndarray, x0: int, y0: int, w: int, h: int, width: int, height: int, read) -> np.ndarray:
    """Fill ``region`` (h, w, 3) with the in-bounds part of [x0, x0+w) x [y0, y0+h)."""
    ax0, ay0 = max(x0, 0), max(y0, 0)
    ax1, ay1 = min(x0 + w, width), min(y0 + h, height)
    if ax1 > ax0 and ay1 > ay0:
        region[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = read(ax0, ay0, ax1 - ax0, ay1 - ay0)
    return region


class ArrayImage:
    """An image held in memory (simulated data, small images)."""

    def __init__(self, array: np.ndarray, path: str | None = None):
        if array.ndim != 3 or array.shape[2] < 3:
            raise StdistillError(f"image must be (height, width, 3) RGB, got shape {array.shape}", path)
        self.array = np.ascontiguousarray(array[..., :3].astype(np.uint8, copy=False))
        self.path = path
        self.size = (self.array.shape[1], self.array.shape[0])
        self._digest: str | None = None

    def _read(self, x, y, w, h):
        return self.array[y : y + h, x : x + w]

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        return _paste(out, x0, y0, w, h, self.size[0], self.size[1], self._read)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        from PIL import Image

        scale = min(1.0, max_size / max(self.size))
        if scale == 1.0:
            return self.array, 1.0
        im = Image.fromarray(self.array).resize(
            (max(1, round(self.size[0] * scale)), max(1, round(self.size[1] * scale))), Image.BILINEAR
        )
        return np.asarray(im), scale

    def digest(self) -> str:
        if self._digest is None:
            self._digest = file_digest(self.path) if self.path else array_digest(self.array)
        return self._digest


class PILImage(ArrayImage):
    """JPEG/PNG/plain TIFF read with Pillow; decoded once on first access (formats without tiles)."""

    def __init__(self, path: str | os.PathLike):
        from PIL import Image

        self.path = str(path)
        try:
            with warnings.catch_warnings():  # big H&E scans are no decompression bombs
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(self.path) as im:
                    self.size = im.size
        except FileNotFoundError:
            raise StdistillError("image file does not exist", path) from None
        except Exception as e:  # PIL raises many types for corrupt files
            raise StdistillError(f"image is unreadable ({type(e).__name__}: {e})", path) from None
        self._array: np.ndarray | None = None
        self._digest = None
        self._lock = threading.Lock()

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """As :meth:`ArrayImage.thumbnail`, but a JPEG not yet decoded is read at reduced scale
        (libjpeg's DCT scaling), which is several times faster than decoding it whole."""
        if self._array is not None or min(1.0, max_size / max(self.size)) == 1.0:
            return super().thumbnail(max_size)
        from PIL import Image

        scale = max_size / max(self.size)
        target = (max(1, round(self.size[0] * scale)), max(1, round(self.size[1] * scale)))
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(self.path) as im:
                im.draft("RGB", target)  # no-op for formats other than JPEG
                small = im.convert("RGB").resize(target, Image.BILINEAR)
        except Exception as e:
            raise StdistillError(f"image is unreadable ({type(e).__name__}: {e})", self.path) from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
        return np.asarray(small), scale

    @property
    def array(self) -> np.ndarray:  # type: ignore[override]
        if self._array is None:
            from PIL import Image

            with self._lock:
                if self._array is None:
                    old = Image.MAX_IMAGE_PIXELS
                    Image.MAX_IMAGE_PIXELS = None  # our own images; size checked above
                    try:
                        arr = _decode_jpeg(self.path)
                        if arr is None:
                            with Image.open(self.path) as im:
                                arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
                        self._array = arr
                    except Exception as e:
                        raise StdistillError(f"image is unreadable ({type(e).__name__}: {e})", self.path) from None
                    finally:
                        Image.MAX_IMAGE_PIXELS = old
        return self._array


def _decode_jpeg(path: str) -> np.ndarray | None:
    """An RGB/greyscale JPEG as an (h, w, 3) uint8 view, decoded by torchvision (libjpeg-turbo).

    About 4x less CPU than Pillow's decode plus copies on a 9000 x 10000 px H&E JPEG, same pixels.
    None for other files, other colour modes, or when torchvision fails (Pillow then decodes).
    """
    if Path(path).suffix.lower() not in (".jpg", ".jpeg"):
        return None
    try:
        from PIL import Image

        with Image.open(path) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        arr = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
    except Exception:
        return None
    arr.flags.writeable = False  # shared by every reader of this file, like Pillow's array
    return arr


def _tiffslide():
    from tiffslide import TiffSlide

    return TiffSlide


def _openslide():
    from openslide import OpenSlide

    return OpenSlide


#: whole-slide readers tried in order: (name, extra that installs it, loader of its slide class)
SLIDE_READERS: list[tuple[str, str, object]] = [("tiffslide", "wsi", _tiffslide), ("openslide", "openslide", _openslide)]


class SlideImage:
    """Pyramidal whole-slide image through tiffslide or openslide (``opener``: the slide class,
    default the first installed); reads only the regions asked."""

    def __init__(self, path: str | os.PathLike, opener=None):
        self.path = str(path)
        if opener is None:
            opener = _first_installed_reader()
        try:
            self._slide = opener(self.path)
        except Exception as e:
            raise StdistillError(f"slide is unreadable ({type(e).__name__}: {e})", path) from None
        self.size = tuple(int(v) for v in self._slide.dimensions)

    def _read(self, x, y, w, h):
        return np.asarray(self._slide.read_region((x, y), 0, (w, h)).convert("RGB"))

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        return _paste(out, x0, y0, w, h, self.size[0], self.size[1], self._read)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        im = self._slide.get_thumbnail((max_size, max_size)).convert("RGB")
        return np.asarray(im), im.size[0] / self.size[0]

    def digest(self) -> str:
        return file_digest(self.path)


def open_image(path: str | os.PathLike) -> ImageReader:
    """Open an image file with the best available lazy reader.

    Raises :class:`StdistillError` naming the file when it is missing or unreadable.
    """
    p = Path(path)
    require_file(p, "image file")
    if p.suffix.lower() in _WSI_SUFFIXES:
        return _open_slide(p)
    return PILImage(p)


def _first_installed_reader():
    """The slide class of the first installed reader in :data:`SLIDE_READERS`."""
    for _, _, load in SLIDE_READERS:
        try:
            return load()
        except ImportError:
            continue
    raise StdistillError("reading whole slides needs tiffslide or openslide: pip install 'stdistill[wsi]'")


def _open_slide(p: Path) -> ImageReader:
    """tiffslide, then openslide for what tiffslide cannot open (MRXS, some NDPI, ...), then
    tifffile for plain TIFFs; one line naming the file and the extra to install when none can."""
    tried, installed = [], []
    for name, _, load in SLIDE_READERS:
        try:
            cls = load()
        except ImportError:
            continue
        installed.append(name)
        try:
            return SlideImage(p, opener=cls)
        except StdistillError as e:
            tried.append(f"{name}: {str(e).removeprefix(f'{e.path}: ')}")
    if p.suffix.lower() in {".tif", ".tiff"} and not tried:
        return _tifffile_image(p)
    missing = [(n, x) for n, x, _ in SLIDE_READERS if n not in installed]
    hint = f"; install {missing[-1][0]}: pip install 'stdistill[{missing[-1][1]}]'" if missing else ""
    what = "; ".join(tried) if tried else "no slide reader is installed"
    raise StdistillError(f"cannot open this {p.suffix} slide ({what}){hint}", p)


def _tifffile_image(p: Path) -> ArrayImage:
    import tifffile

    try:
        arr = tifffile.imread(p)
    except Exception as e:
        raise StdistillError(f"image is unreadable ({type(e).__name__}: {e})", p) from None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype != np.uint8:
        raise StdistillError(f"expected an 8-bit RGB image, got dtype {arr.dtype}", p)
    return ArrayImage(arr, path=str(p))


def write_pyramid_tiff(path: str | os.PathLike, image: np.ndarray, microns_per_pixel: float, levels: int = 3,
                       tile: int = 128) -> Path:
    """Write an RGB uint8 array (height, width, 3) as a tiled pyramidal TIFF (level 0 plus
    ``levels - 1`` halvings as SubIFDs) recording ``microns_per_pixel`` (um/px), atomically.
    tiffslide reads it as a whole-slide image with ``tiffslide.mpp-x`` set."""
    import tifffile

    from .._utils import atomic_path

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise StdistillError(f"expected an RGB uint8 (height, width, 3) array, got {image.dtype} {image.shape}", path)
    path = Path(path)
    res = (1e4 / microns_per_pixel, 1e4 / microns_per_pixel)  # pixels per centimetre
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tw:
        tw.write(image, tile=(tile, tile), subifds=levels - 1, photometric="rgb", compression="zlib",
                 resolution=res, resolutionunit="CENTIMETER")
        for k in range(1, levels):
            tw.write(np.ascontiguousarray(image[:: 2**k, :: 2**k]), tile=(tile, tile), subfiletype=1,
                     photometric="rgb", compression="zlib")
    return path
