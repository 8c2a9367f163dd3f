"""Stain normalisation inside extraction: each section's stain estimate and the reference they map onto."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

from .._errors import StdistillError
from .._keys import Key
from ..io._section import has_image, sections
from ._encode import _Job, _light


def _section_estimates(ds, sec: np.ndarray, secs: list[str], norm, n_sample: int = 64) -> dict[str, dict]:
    """``{section: stain estimate}`` of ``norm``'s method, each from up to ``n_sample`` of the
    section's unpadded patches of ``ds`` (evenly spread over its rows)."""
    out = {}
    for s in secs:
        rows = np.flatnonzero(sec == s)
        clean = rows[~ds.padded[rows]]
        rows = clean if len(clean) else rows
        pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(n_sample, len(rows))).round().astype(int))]
        try:
            out[s] = norm.estimate([ds.read(int(i)) for i in pick])
        except StdistillError as e:
            raise StdistillError(f"section {s!r}: {e}") from None
    return out


def stain_estimates(adata: ad.AnnData, method: str, *, size_um: float = 112.0, px: int = 224,
                    n_sample: int = 64) -> dict[str, dict]:
    """Each imaged section's stain estimate, as :func:`extract` makes it (up to ``n_sample`` of its
    ``size_um`` patches at ``px``). Pass them back as ``extract(stain_sources=...)`` to normalise
    parts of a section (e.g. a slide encoded chunk by chunk) with one estimate."""
    from ..pp._stain import StainNormalizer
    from ..pp.patches import PatchDataset

    imaged = [s for s in sections(adata) if has_image(adata, s)]
    light, _ = _light(adata, imaged)
    ds = PatchDataset(light, size_um=size_um, px=px)
    return _section_estimates(ds, light.obs[Key.obs.section].astype(str).to_numpy(), imaged, StainNormalizer(method), n_sample)


def _stain(job: _Job, imaged: list[str], method: str | None, reference: Any, stain_sources: dict | None = None,
           n_sample: int = 64):
    """(patch transform, uns record, per-section cache-key part); all None without ``method``."""
    from ..pp._stain import (
        SectionStainTransform,
        StainNormalizer,
        check_method,
        round_estimate,
    )

    if method is None:
        if reference is not None or stain_sources:
            raise StdistillError("stain_reference or stain_sources is set but stain_norm is None; pass stain_norm='macenko' "
                                 "or 'reinhard'")
        return None, None, {}
    method = check_method(method)
    ref_section = ""
    if isinstance(reference, StainNormalizer):
        norm = reference
    elif isinstance(reference, dict):
        norm = StainNormalizer.from_state(reference)
    elif reference is None or isinstance(reference, str):
        ref_section = imaged[0] if reference is None else reference
        if ref_section not in imaged:
            raise StdistillError(f"stain_reference {ref_section!r} is not an imaged section here ({imaged}); "
                                 "pass a section name or a stored state (uns['features'][key]['stain'])")
        norm = StainNormalizer(method)
    else:
        raise StdistillError(f"stain_reference must be None, a section name, a stored state or a StainNormalizer, "
                             f"got {type(reference).__name__}")
    if norm.method != method:
        raise StdistillError(f"stain_reference was fitted with {norm.method!r}, but stain_norm is {method!r}")
    given = {s: round_estimate(v) for s, v in (stain_sources or {}).items()}
    sources = {**_section_estimates(job.ds, job.sec, [s for s in imaged if s not in given], norm, n_sample),
               **{s: given[s] for s in imaged if s in given}}
    if ref_section:
        norm.reference = sources[ref_section]
    record = {**norm.state(), "reference_section": ref_section, "sections": sources}
    parts = {s: {"method": method, "reference": norm.reference, "source": sources[s], "n_sample": n_sample} for s in imaged}
    return SectionStainTransform(norm, sources, job.sec), record, parts
