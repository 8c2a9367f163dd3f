"""What one extraction did, per section (cache hit, computed, skipped) and in seconds."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class SectionStatus:
    section: str
    n_spots: int
    status: str  # "cache hit", "computed", "skipped (no image)"
    entry: str | None = None


@dataclass
class ExtractionReport:
    """What :func:`extract` did: per section, a cache hit, computed or skipped."""

    encoder: str
    key_added: str
    precision: str
    device: str
    seconds: float = 0.0
    patches_computed: int = 0
    sections: list[SectionStatus] = field(default_factory=list)
    #: seconds of the clean pass (stain estimates included), and of the ``views`` augmented passes
    seconds_clean: float = 0.0
    views: int = 0
    seconds_views: float = 0.0

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([s.__dict__ for s in self.sections]).set_index("section")
