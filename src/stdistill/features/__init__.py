"""Patch features per spot: batched extraction with any registered encoder, cached on disk.

>>> import stdistill as sd
>>> sd.features.extract(adata)               # obsm["X_effnet-lite0-imagenet"], (n_spots, 1280)
>>> sd.features.extract(adata, "uni", device="cuda")        # a hub model (gated: log in first)
>>> sd.features.extract(adata, strategy="ddp", devices=4)   # sharded over 4 GPUs (Lightning)
>>> sd.features.extract_manifest("slides.tsv", "features/")  # many slides: failures isolated, resumable
"""

from ._manifest import ManifestReport, extract_manifest, read_manifest
from ._matrix import feature_matrix
from .cache import FeatureCache, default_cache_dir
from .extract import (
    DEFAULT_ENCODER,
    ExtractionReport,
    extract,
    extraction_kwargs,
    resolve_precision,
    run_extraction,
    stain_estimates,
)


def __getattr__(name: str):
    if name == "extract_distributed":  # imports Lightning: only on use
        from .distributed import extract_distributed

        return extract_distributed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_ENCODER",
    "ExtractionReport",
    "FeatureCache",
    "ManifestReport",
    "default_cache_dir",
    "extract",
    "extract_distributed",
    "extraction_kwargs",
    "extract_manifest",
    "feature_matrix",
    "read_manifest",
    "resolve_precision",
    "run_extraction",
    "stain_estimates",
]
