"""Stain normalisation of H&E patches (Macenko, Reinhard) with per-section stain estimates.

The stain of a section is estimated once from a sample of its patches (torchstain's
``fit`` on a montage of them), and every patch of the section is mapped with that one
estimate onto a reference estimate (a training section's, or any stored one). Normalising
per section, not per patch, keeps the mapping the same for every patch of a slide and makes a
new slide normalised exactly as the training slides were, from its stored estimate.

- Macenko: the estimate is the (3, 2) optical-density stain matrix (columns: haematoxylin,
  eosin; unit length) and the 99th percentiles of the two stain concentrations. A patch's
  optical density is unmixed with the section's matrix, its concentrations rescaled to the
  reference's percentiles and remixed with the reference matrix.
- Reinhard: the estimate is the mean and standard deviation of the three LAB channels; each
  channel is standardised with the section's statistics and rescaled to the reference's.

Needs the ``stain`` extra (``pip install stdistill[stain]``: torchstain, MIT).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._errors import StdistillError
from ..encoders.registry import STAIN_METHODS  # noqa: F401 - re-exported (stdistill.pp.STAIN_METHODS)

#: transmitted light intensity (0-255), percentile and optical-density threshold of Macenko's method
MACENKO_DEFAULTS = {"io": 240.0, "alpha": 1.0, "beta": 0.15}


def _torchstain():
    try:
        import torchstain.torch.normalizers as tsn
        import torchstain.torch.utils as tsu
    except ImportError:
        raise StdistillError("stain normalisation needs torchstain: pip install 'stdistill[stain]'") from None
    return tsn, tsu


def check_method(method: str) -> str:
    """``method`` lower-cased, or a StdistillError naming the choices."""
    m = str(method).lower()
    if m not in STAIN_METHODS:
        raise StdistillError(f"stain_norm must be one of {STAIN_METHODS} or None, got {method!r}")
    return m


def montage(patches: Sequence[np.ndarray] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Patches side by side: uint8 (3, H, N * W) from N RGB patches (H, W, 3) or (3, H, W)."""
    if isinstance(patches, torch.Tensor) and patches.ndim == 3:
        patches = [patches]
    if isinstance(patches, np.ndarray) and patches.ndim == 3:
        patches = [patches]
    ts = []
    for p in patches:
        t = p if isinstance(p, torch.Tensor) else torch.from_numpy(np.array(p, copy=True))
        if t.ndim != 3 or 3 not in (t.shape[0], t.shape[-1]):
            raise StdistillError(f"a patch must be RGB (H, W, 3) or (3, H, W), got shape {tuple(t.shape)}")
        ts.append(t if t.shape[0] == 3 else t.permute(2, 0, 1))
    if not ts:
        raise StdistillError("no patches to estimate a stain from")
    if len({t.shape[1] for t in ts}) > 1:
        raise StdistillError("patches of one stain estimate must share their height")
    return torch.cat(ts, dim=2).to(torch.uint8)


def estimate_stain(patches, method: str = "macenko") -> dict[str, Any]:
    """The stain estimate of a set of patches (one section), as JSON-able lists.

    ``patches``: RGB uint8 patches (H, W, 3) or (3, H, W), or one image. Returns for Macenko
    ``{"he": (3, 2) stain matrix in optical density, "max_c": (2,) 99th percentile
    concentrations}``, for Reinhard ``{"mean": (3,), "std": (3,)}`` of LAB (L in 0-100).
    """
    method = check_method(method)
    tsn, _ = _torchstain()
    img = montage(patches)
    if method == "macenko":
        n = tsn.TorchMacenkoNormalizer()
        d = MACENKO_DEFAULTS
        try:
            n.fit(img, Io=d["io"], alpha=d["alpha"], beta=d["beta"])
        except (RuntimeError, IndexError) as e:  # no stained pixels: eigh/percentile on nothing
            raise StdistillError(f"cannot estimate a Macenko stain matrix (blank patches?): {str(e).splitlines()[0]}") from None
        he, max_c = n.HERef.double(), n.maxCRef.double()
        he = he / he.norm(dim=0, keepdim=True)
        return {"he": he.tolist(), "max_c": max_c.tolist()}
    n = tsn.TorchReinhardNormalizer()
    n.fit(img)
    return {"mean": n.target_means.double().tolist(), "std": n.target_stds.double().tolist()}


def _macenko(x: torch.Tensor, src: dict, ref: dict) -> torch.Tensor:
    io = MACENKO_DEFAULTS["io"]
    he_src = torch.tensor(src["he"], dtype=torch.float32)
    he_ref = torch.tensor(ref["he"], dtype=torch.float32)
    scale = torch.tensor(ref["max_c"], dtype=torch.float32) / torch.tensor(src["max_c"], dtype=torch.float32).clamp_min(1e-6)
    c, h, w = x.shape
    od = -torch.log((x.reshape(3, -1).float() + 1.0) / io)  # (3, HW)
    conc = torch.linalg.pinv(he_src) @ od  # (2, HW)
    out = io * torch.exp(-(he_ref @ (conc * scale[:, None])))
    return out.clamp(0, 255).round().to(torch.uint8).reshape(c, h, w)


def _reinhard(x: torch.Tensor, src: dict, ref: dict) -> torch.Tensor:
    _, tsu = _torchstain()
    labs = tsu.lab_split(tsu.rgb2lab(x.float() / 255.0))
    out = [(ch - ms) / max(ss, 1e-6) * sr + mr for ch, ms, ss, mr, sr in zip(labs, src["mean"], src["std"], ref["mean"], ref["std"])]
    rgb = tsu.lab2rgb(tsu.lab_merge(*out))  # (H, W, 3) in [0, 1]
    return (rgb * 255.0).clamp(0, 255).round().to(torch.uint8).permute(2, 0, 1).contiguous()


def normalize_stain(patch: torch.Tensor, source: dict, reference: dict, method: str = "macenko") -> torch.Tensor:
    """Map one uint8 patch (3, H, W) from its section's stain ``source`` to ``reference``.

    Both estimates come from :func:`estimate_stain` with the same ``method``. Returns uint8
    (3, H, W).
    """
    method = check_method(method)
    fn = _macenko if method == "macenko" else _reinhard
    return fn(patch, source, reference)


class StainNormalizer:
    """A stain method and its reference estimate: fit on reference patches, then map each
    section's patches (given that section's estimate) onto the reference.

    >>> sn = StainNormalizer("macenko").fit(train_patches)   # reference: a training section
    >>> src = sn.estimate(new_section_patches)               # the new section's stain
    >>> out = sn.transform(patch, src)                        # uint8 (3, H, W)
    """

    def __init__(self, method: str = "macenko", reference: dict | None = None):
        self.method = check_method(method)
        self.reference = None if reference is None else round_estimate(reference)

    def __repr__(self) -> str:
        return f"StainNormalizer({self.method!r}, fitted={self.reference is not None})"

    def fit(self, patches) -> StainNormalizer:
        """Take the reference estimate from ``patches`` (RGB uint8, see :func:`estimate_stain`)."""
        self.reference = round_estimate(estimate_stain(patches, self.method))
        return self

    def estimate(self, patches) -> dict:
        """A section's stain estimate (same method)."""
        return round_estimate(estimate_stain(patches, self.method))

    def transform(self, patch: torch.Tensor, source: dict) -> torch.Tensor:
        """``patch`` (uint8, 3 x H x W) of a section with estimate ``source`` -> the reference's stain."""
        if self.reference is None:
            raise StdistillError("StainNormalizer is not fitted: call .fit(reference patches) or pass reference=")
        return normalize_stain(patch, source, self.reference, self.method)

    def state(self) -> dict:
        """JSON-able ``{"method", "reference"}``: stored with the features, and accepted back as
        ``StainNormalizer.from_state`` or ``features.extract(stain_reference=...)``."""
        if self.reference is None:
            raise StdistillError("StainNormalizer is not fitted")
        return {"method": self.method, "reference": self.reference}

    @classmethod
    def from_state(cls, state: dict) -> StainNormalizer:
        try:
            return cls(state["method"], _plain(state["reference"]))
        except (KeyError, TypeError):
            raise StdistillError("a stain state needs 'method' and 'reference' (as written by StainNormalizer.state())") from None


def _plain(d: Any) -> Any:
    """Arrays (e.g. read back from .h5ad) as nested lists."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, np.ndarray):
        return d.tolist()
    return d


def round_estimate(d: dict, digits: int = 6) -> dict:
    """An estimate with floats rounded (stable cache keys across platforms)."""
    return json.loads(json.dumps(_plain(d)), parse_float=lambda s: round(float(s), digits))


class SectionStainTransform:
    """Picklable patch transform of :class:`~stdistill.pp.PatchDataset`: patch ``i`` is mapped
    with its section's estimate ``sources[section_of[i]]`` onto ``normalizer``'s reference."""

    def __init__(self, normalizer: StainNormalizer, sources: dict[str, dict], section_of: np.ndarray):
        self.normalizer, self.sources, self.section_of = normalizer, sources, np.asarray(section_of)

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.normalizer.transform(x, self.sources[str(self.section_of[i])])
