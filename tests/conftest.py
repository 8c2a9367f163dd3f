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
