"""Whole-slide readers: tiffslide first, openslide (the `openslide` extra) for what tiffslide cannot
open, one error line naming the file and the extra when neither can. Readers are monkeypatched."""

import numpy as np
import pytest
from PIL import Image

import stdistill.io._image as im
from stdistill import StdistillError


class _FakeOpenSlide:
    dimensions = (300, 200)
    properties = {"openslide.mpp-x": "0.25"}

    def __init__(self, path):
        self.path = path

    def read_region(self, xy, level, wh):
        return Image.new("RGBA", wh, (200, 100, 150, 255))

    def get_thumbnail(self, size):
        return Image.new("RGB", (size[0], size[0] * 2 // 3), (200, 100, 150))


def _refuses(path):
    raise OSError("Unsupported or missing image file")


def _missing():
    raise ImportError("not installed")


@pytest.fixture
def mrxs(tmp_path):
    p = tmp_path / "slide.mrxs"
    p.write_bytes(b"not a tiff")
    return p


def test_openslide_opens_what_tiffslide_cannot(monkeypatch, mrxs):
    monkeypatch.setattr(im, "SLIDE_READERS", [("tiffslide", "wsi", lambda: _refuses),
                                              ("openslide", "openslide", lambda: _FakeOpenSlide)])
    r = im.open_image(mrxs)
    assert isinstance(r._slide, _FakeOpenSlide) and r.size == (300, 200)
    assert r.read_region(290, 0, 20, 5)[0, -1].tolist() == [255, 255, 255]  # outside: white
    assert r.read_region(0, 0, 4, 4)[0, 0].tolist() == [200, 100, 150]
    from stdistill.pp.tile import slide_mpp

    assert slide_mpp(r) == 0.25


def test_no_reader_can_open_it_is_one_line(monkeypatch, mrxs):
    monkeypatch.setattr(im, "SLIDE_READERS", [("tiffslide", "wsi", lambda: _refuses),
                                              ("openslide", "openslide", _missing)])
    with pytest.raises(StdistillError) as e:
        im.open_image(mrxs)
    msg = str(e.value)
    assert "\n" not in msg and str(mrxs) in msg and "tiffslide: slide is unreadable" in msg
    assert "pip install 'stdistill[openslide]'" in msg
    monkeypatch.setattr(im, "SLIDE_READERS", [("tiffslide", "wsi", _missing), ("openslide", "openslide", _missing)])
    with pytest.raises(StdistillError, match=r"slide\.mrxs: cannot open this \.mrxs slide \(no slide reader is installed\)"):
        im.open_image(mrxs)
    monkeypatch.setattr(im, "SLIDE_READERS", [("tiffslide", "wsi", lambda: _refuses),
                                              ("openslide", "openslide", lambda: _refuses)])
    with pytest.raises(StdistillError, match="openslide: slide is unreadable") as e:
        im.open_image(mrxs)
    assert "pip install" not in str(e.value)  # both installed: nothing to suggest


def test_plain_tiff_without_slide_readers(monkeypatch, tmp_path):
    import tifffile

    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, np.full((8, 10, 3), 7, np.uint8))
    monkeypatch.setattr(im, "SLIDE_READERS", [("tiffslide", "wsi", _missing), ("openslide", "openslide", _missing)])
    assert im.open_image(p).size == (10, 8)
