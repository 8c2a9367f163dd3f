"""Helpers shared by the plotting functions."""

from __future__ import annotations

import anndata as ad
import numpy as np

from .._errors import StdistillError
from ..io._section import SECTION_KEY, sections


def _one_section(adata: ad.AnnData, section: str | None) -> tuple[str, np.ndarray]:
    """The section to draw (``None``: the only one) and its boolean spot mask (n_obs,)."""
    secs = sections(adata)
    if section is None:
        if len(secs) != 1:
            raise StdistillError(f"AnnData holds {len(secs)} sections: pass section= (one of {secs[:6]})")
        section = secs[0]
    if section not in secs:
        raise StdistillError(f"section {section!r} is not in the AnnData (has {secs[:6]})")
    return section, adata.obs[SECTION_KEY].astype(str).to_numpy() == section
