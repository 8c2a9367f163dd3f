"""Small synthetic H&E slides (pyramidal TIFF) and a tiny niche bundle for the slide tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE_UM, PX = 32.0, 32


def he_image(w: int = 768, h: int = 576, seed: int = 0, smear: bool = True, pen: bool = True) -> np.ndarray:
    """Glass with two stained tissue pieces (left half pink-purple stripes, right half paler),
    optionally a faint pink smear on the glass (bottom left) and a green pen line (top)."""
    from skimage.color import hed2rgb

    rng = np.random.default_rng(seed)
    img = np.clip(248 + rng.normal(0, 2, (h, w, 3)), 0, 255)
    y0, y1, x0, x1 = h // 6, h * 2 // 3, w // 8, w * 7 // 8
    hed = np.zeros((y1 - y0, x1 - x0, 3))
    hed[..., 0] = 0.03 + 0.12 * (rng.random((y1 - y0, x1 - x0)) < 0.12)
    hed[..., 1] = 0.04 + 0.02 * ((np.arange(x1 - x0) // 96) % 2)[None, :]  # bands: two textures
    img[y0:y1, x0:x1] = hed2rgb(hed) * 255
    if smear:  # a pale pink film: saturated enough for Otsu on saturation, far too faint for tissue
        img[h * 3 // 4: h - 10, 20: w // 3] = (240, 170, 215)
    if pen:
        img[20:32, w // 4: w * 3 // 4] = (40, 150, 60)
    return img.astype(np.uint8)


def write_pyramid(path: Path, img: np.ndarray, mpp: float = 1.0, levels: int = 3) -> Path:
    """A tiled pyramidal TIFF (level 0 + sub-resolutions) recording ``mpp`` um/px."""
    from stdistill.io import write_pyramid_tiff

    return write_pyramid_tiff(path, img, mpp, levels=levels)


def niche_bundle(path: Path, encoder: str, seed: int = 0) -> Path:
    """Train a 2-niche student on tiny colour sections with ``encoder`` features; save it as a bundle."""
    from _io_helpers import colour_sections

    import stdistill as sd
    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    a = colour_sections(2, 5, seed=seed)
    sd.features.extract(a, encoder, size_um=SIZE_UM, px=PX, device="cpu", precision="fp32", cache_dir=False)
    NicheTeacher(2, seed=seed).fit_predict(a)
    s = NicheStudent(feature_key=f"X_{encoder}", radius_um=80, max_epochs=2, val_patients=None, n_pcs=8, seed=seed)
    s.fit(a)
    sd.bundle.save_bundle(s, path)
    return path


def corrupt_tiles(path: Path, tiles: list[tuple[int, int]]) -> Path:
    """Overwrite the bytes of level-0 TIFF tiles (row, col) with zeros: undecodable, the file's length kept."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
        per_row = -(-page.imagewidth // page.tilewidth)
    with open(path, "r+b") as fh:
        for r, c in tiles:
            fh.seek(offsets[r * per_row + c])
            fh.write(b"\0" * counts[r * per_row + c])
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes (an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def fat_slide(w: int = 1400, h: int = 1200, seed: int = 0) -> np.ndarray:
    """Glass around a stained tissue rectangle [400, 800) x [400, 1000) px holding a 260 x 260 px
    patch of fat: white cells about 60 px across with faint pink-grey membranes (at 1 um/px a
    67,600 um^2 hole, larger than the holes filled by area alone)."""
    from scipy.spatial import cKDTree
    from skimage.color import hed2rgb

    rng = np.random.default_rng(seed)
    img = np.clip(246 + rng.normal(0, 2, (h, w, 3)), 0, 255)
    hed = np.zeros((400, 600, 3))
    hed[..., 0] = 0.03 + 0.12 * (rng.random((400, 600)) < 0.12)
    hed[..., 1] = 0.05
    img[400:800, 400:1000] = hed2rgb(hed) * 255
    centres = np.mgrid[410:800:60, 510:890:60].reshape(2, -1).T
    centres = centres + rng.uniform(-15, 15, centres.shape)
    yy, xx = np.mgrid[470:730, 570:830]
    d, _ = cKDTree(centres).query(np.c_[yy.ravel(), xx.ravel()], k=2)
    fat = np.clip(247 + rng.normal(0, 2, (260, 260, 3)), 0, 255)
    fat[(d[:, 1] - d[:, 0] < 3).reshape(260, 260)] = (215, 185, 210)
    img[470:730, 570:830] = fat
    return img.astype(np.uint8)
