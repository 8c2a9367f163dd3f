"""Lazy readers of full-resolution H&E images.

A reader never holds a whole slide unless the file format forces it (plain JPEG/PNG are
decoded once, on the first region read). Pyramidal TIFF/SVS/NDPI go through tiffslide
(``pip install stdistill[wsi]``), and what tiffslide cannot open (MRXS, ...) through openslide
(``stdistill[openslide]``); plain TIFF through tifffile when neither is installed.
Coordinates are full-resolution pixels, (x, y) = (column, row).
"""

from __future__ import annotations

import inspect
import os
import threading
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from .._errors import StdistillError, require_file
from .._utils import array_digest, file_digest
from ._pixels import (
    PixelLayout,
    UnreadableRegion,
    is_tiff,
    over_white,
    quiet_readers,
    reader_failure,
    tiff_layout,
    to_rgb8,
)

PAD_VALUE = 255  # white, like glass background
WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".tif", ".tiff"}
_TIFF_BASED = {".svs", ".ndpi", ".scn", ".bif", ".tif", ".tiff"}


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


def paste_region(region: np.ndarray, x0: int, y0: int, w: int, h: int, width: int, height: int, read) -> np.ndarray:
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
        return paste_region(out, x0, y0, w, h, self.size[0], self.size[1], self._read)

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


_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _pil_rgb(im):
    """An opened Pillow image as RGB: alpha (RGBA, palette with transparency) composited onto white,
    CMYK/YCbCr/LAB converted; greyscale was refused when the file was opened."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "PA", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (PAD_VALUE,) * 4)
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _pil_failure(e: Exception) -> str:
    if "truncated" in str(e).lower():
        return "the image file is truncated (an interrupted copy?); copy it again"
    return f"image is unreadable ({type(e).__name__}: {e})"


class PILImage(ArrayImage):
    """JPEG/PNG/plain TIFF read with Pillow; decoded once on first access (formats without tiles).
    Palette, RGBA (onto white), CMYK images are converted to RGB; greyscale is refused."""

    def __init__(self, path: str | os.PathLike):
        from PIL import Image

        self.path = str(path)
        try:
            with warnings.catch_warnings():  # big H&E scans are no decompression bombs
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(self.path) as im:
                    self.size, self.mode = im.size, im.mode
        except FileNotFoundError:
            raise StdistillError("image file does not exist", path) from None
        except Exception as e:  # PIL raises many types for corrupt files
            raise StdistillError(_pil_failure(e), path) from None
        if self.mode in _GREY_MODES:
            raise StdistillError(f"greyscale image (mode {self.mode}); an H&E slide is read in colour (tissue detection "
                                 "and encoders need the stains): export it as RGB", path)
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
                small = _pil_rgb(im).resize(target, Image.BILINEAR)
        except Exception as e:
            raise StdistillError(_pil_failure(e), self.path) from None
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
                                arr = np.asarray(_pil_rgb(im))
                        self._array = arr
                    except Exception as e:
                        raise StdistillError(_pil_failure(e), self.path) from None
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
    default the first installed); reads only the regions asked.

    ``layout`` (:class:`~stdistill.io._pixels.PixelLayout`, from :func:`tiff_layout`) says how
    regions are made 8-bit RGB (16-bit, RGBA, CMYK, palette slides). A region that cannot be
    decoded raises :class:`UnreadableRegion` (one line); the reading libraries' log messages are
    kept out of the terminal while they read. Picklable: a copy opens the file again (one file
    handle per process, e.g. per DataLoader worker)."""

    def __init__(self, path: str | os.PathLike, opener=None, layout: PixelLayout | None = None):
        self.path = str(path)
        self._opener = opener if opener is not None else _first_installed_reader()
        self.layout = layout or PixelLayout()
        self._open()

    def _open(self) -> None:
        with quiet_readers():
            try:
                self._slide = self._opener(self.path)
                self.size = tuple(int(v) for v in self._slide.dimensions)
            except Exception as e:
                raise StdistillError(f"slide is unreadable ({reader_failure(e)})", self.path) from None
        self._as_array = "as_array" in inspect.signature(self._slide.read_region).parameters

    @classmethod
    def from_handle(cls, handle) -> SlideImage:
        """A reader around an open ``tiffslide.TiffSlide`` or ``openslide.OpenSlide`` (its file is
        opened again by copies of the reader in worker processes)."""
        path = getattr(handle, "_filename", None)
        if path is None and hasattr(handle, "ts_tifffile"):
            path = handle.ts_tifffile.filehandle.path
        self = cls.__new__(cls)
        self.path, self._opener, self._slide = str(path) if path else None, type(handle), handle
        self.layout = (tiff_layout(path) or PixelLayout()) if path and Path(path).is_file() else PixelLayout()
        self.size = tuple(int(v) for v in handle.dimensions)
        self._as_array = "as_array" in inspect.signature(handle.read_region).parameters
        return self

    def reopened(self) -> SlideImage:
        """The same slide opened again (its own file handle), for another process."""
        if self.path is None:
            raise StdistillError("this slide reader has no file to open again in another process; use num_workers=0")
        return SlideImage(self.path, opener=self._opener, layout=self.layout)

    def __getstate__(self) -> dict:
        if self.path is None:
            raise StdistillError("this slide reader has no file to open again in another process; use num_workers=0")
        return {"path": self.path, "_opener": self._opener, "layout": self.layout}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def _region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        if self._as_array:
            return self._slide.read_region((x, y), level, (w, h), as_array=True)
        return np.asarray(self._slide.read_region((x, y), level, (w, h)))

    def _read(self, x, y, w, h):
        with quiet_readers():
            try:
                return to_rgb8(self._region(x, y, w, h), self.layout)
            except Exception as e:  # noqa: BLE001 - codecs, zarr and openslide raise many types
                why = reader_failure(e)
            _collect_quietly()
        raise UnreadableRegion(f"the region at x={x}, y={y} ({w}x{h} px) cannot be decoded ({why}); the file may be "
                               "damaged", self.path)

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        return paste_region(out, x0, y0, w, h, self.size[0], self.size[1], self._read)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """The overview: the reader's own thumbnail for 8-bit RGB slides; else (other pixel
        layouts, or a damaged block in the level it reads) the best level read block by block,
        undecodable blocks left white, refused when more than half of them are."""
        arr = None
        if self.layout.native:
            with quiet_readers():
                try:
                    im = self._slide.get_thumbnail((max_size, max_size))
                    arr = over_white(np.asarray(im)) if im.mode == "RGBA" else np.asarray(im.convert("RGB"))
                except Exception:  # noqa: BLE001 - read again block by block below
                    arr = None
                if arr is None:
                    _collect_quietly()
        if arr is None:
            arr = self._block_thumbnail(max_size)
        return arr, arr.shape[1] / self.size[0]

    def _block_thumbnail(self, max_size: int, block: int = 256) -> np.ndarray:
        from PIL import Image

        down = max(max(self.size) / max_size, 1.0)
        level = int(self._slide.get_best_level_for_downsample(down))
        lw, lh = (int(v) for v in self._slide.level_dimensions[level])
        f = float(self._slide.level_downsamples[level])
        img = np.full((lh, lw, 3), PAD_VALUE, np.uint8)
        n = bad = 0
        with quiet_readers():
            for y in range(0, lh, block):
                for x in range(0, lw, block):
                    w, h = min(block, lw - x), min(block, lh - y)
                    n += 1
                    try:
                        img[y:y + h, x:x + w] = to_rgb8(self._region(int(round(x * f)), int(round(y * f)), w, h, level),
                                                        self.layout)
                    except Exception as e:  # noqa: BLE001
                        bad, why = bad + 1, reader_failure(e)
            if bad:
                _collect_quietly()
        if bad * 2 > n:
            raise StdistillError(f"the slide's overview cannot be read ({bad} of {n} blocks fail: {why}); the file is "
                                 "damaged", self.path)
        target = (max(1, round(self.size[0] / down)), max(1, round(self.size[1] / down)))
        return np.asarray(Image.fromarray(img).resize(target, Image.BILINEAR)) if target != (lw, lh) else img

    def digest(self) -> str:
        return file_digest(self.path)


def open_image(path: str | os.PathLike) -> ImageReader:
    """Open an image file with the best available lazy reader.

    Raises :class:`StdistillError` naming the file when it is missing, empty, not readable by
    this user, truncated, or in a pixel format that cannot be made RGB (greyscale, float).
    """
    p = Path(path)
    require_file(p, "image file")
    if not os.access(p, os.R_OK):
        raise StdistillError("no permission to read the file", p)
    if p.stat().st_size == 0:
        raise StdistillError("the file is empty (0 bytes)", p)
    if p.suffix.lower() in WSI_SUFFIXES:
        return _open_slide(p)
    return PILImage(p)


def _collect_quietly() -> None:
    """Collect what a failed read left behind (zarr's orphaned tasks) while the reading libraries'
    messages are kept out of the terminal, so they are not printed later, when the process exits."""
    import gc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gc.collect()


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
    tifffile for plain TIFFs; one line naming the file and the extra to install when none can.
    A TIFF-based file is checked first (:func:`tiff_layout`: complete, convertible to RGB)."""
    if p.suffix.lower() in _TIFF_BASED and not is_tiff(p):
        with open(p, "rb") as fh:
            head = fh.read(8)
        raise StdistillError(f"not a {p.suffix} slide: a {p.suffix} file is a TIFF, but this one starts with {head!r} "
                             "(a wrong extension, or not an image)", p)
    layout = tiff_layout(p)
    tried, installed = [], []
    for name, _, load in SLIDE_READERS:
        try:
            cls = load()
        except ImportError:
            continue
        installed.append(name)
        try:
            return SlideImage(p, opener=cls, layout=layout)
        except StdistillError as e:
            tried.append(f"{name}: {str(e).removeprefix(f'{e.path}: ')}")
    if p.suffix.lower() in {".tif", ".tiff"} and not tried:
        return _tifffile_image(p, layout)
    missing = [(n, x) for n, x, _ in SLIDE_READERS if n not in installed]
    hint = f"; install {missing[-1][0]}: pip install 'stdistill[{missing[-1][1]}]'" if missing else ""
    what = "; ".join(tried) if tried else "no slide reader is installed"
    raise StdistillError(f"cannot open this {p.suffix} slide ({what}){hint}", p)


def _tifffile_image(p: Path, layout: PixelLayout | None) -> ArrayImage:
    import tifffile

    with quiet_readers():
        try:
            arr = tifffile.imread(p)
        except Exception as e:
            raise StdistillError(f"image is unreadable ({reader_failure(e)})", p) from None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    return ArrayImage(to_rgb8(arr, layout or PixelLayout()), path=str(p))


def write_pyramid_tiff(path: str | os.PathLike, image: np.ndarray, microns_per_pixel: float, levels: int = 3,
                       tile: int = 128, compression: str = "zlib", compressionargs: dict | None = None) -> Path:
    """Write an RGB uint8 array (height, width, 3) as a tiled pyramidal TIFF (level 0 plus
    ``levels - 1`` halvings, as a chain of main IFDs, which both tiffslide and OpenSlide read as
    levels) recording ``microns_per_pixel`` (um/px), atomically. ``compression``: a tifffile
    codec name ("zlib", "jpeg", ...) with its ``compressionargs`` (e.g. ``{"level": 90}``)."""
    import tifffile

    from .._utils import atomic_path

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise StdistillError(f"expected an RGB uint8 (height, width, 3) array, got {image.dtype} {image.shape}", path)
    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tw:
        for k in range(levels):
            res = 1e4 / (microns_per_pixel * 2**k)  # pixels per centimetre
            tw.write(np.ascontiguousarray(image[:: 2**k, :: 2**k]), tile=(tile, tile), photometric="rgb",
                     compression=compression, compressionargs=compressionargs, subfiletype=0 if k == 0 else 1,
                     resolution=(res, res),
                     resolutionunit="CENTIMETER")
    return path
