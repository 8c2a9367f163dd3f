import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STDISTILL_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"{p} is absent: this test needs the shared public data beside the repo (../shared/data/{name})")
    return p


@pytest.fixture
def her2st_root() -> Path:
    return _shared("her2st")


@pytest.fixture
def visium_dir() -> Path:
    return _shared("scanpy-visium-subset") / "1.0.0"


@pytest.fixture
def mob_root() -> Path:
    return _shared("mob-st-stahl2016-spacest")


# tiny random-weight encoders (same weights on every load, as a real weights file would give)
TINY_EFF, TINY_VIT = "test-tiny-effnet", "test-tiny-vit"


def _seeded(fn):
    def make():
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(0)
            return fn()

    return make


def register_tiny_encoders() -> None:
    """Register ``TINY_EFF`` (tf_efficientnet_lite0, 1280-d) and ``TINY_VIT`` (3-block ViT, 192-d), 32 px input."""
    import timm

    import stdistill as sd

    sd.encoders.register_module(TINY_EFF, _seeded(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)),
                                mean=(0.5,) * 3, std=(0.5,) * 3, input_px=32, dim=1280, overwrite=True)
    sd.encoders.register_module(TINY_VIT, _seeded(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                                                            img_size=32, patch_size=8, depth=3)),
                                mean=(0.5,) * 3, std=(0.5,) * 3, input_px=32, dim=192, overwrite=True)


@pytest.fixture(scope="session")
def tiny_encoders():
    """The tiny encoders of :func:`register_tiny_encoders`, for the session."""
    import stdistill as sd

    register_tiny_encoders()
    yield
    for n in (TINY_EFF, TINY_VIT):
        sd.encoders.unregister(n)


@pytest.fixture(scope="session")
def slide_bundle(tmp_path_factory, tiny_encoders) -> Path:
    """A tiny 2-niche student bundle (tiny encoder, 32 um / 32 px patches) for slide runs."""
    from _slide_helpers import niche_bundle

    return niche_bundle(tmp_path_factory.mktemp("slide_bundle") / "niches", TINY_EFF)
