"""Readers and writers, and the section data model (see :mod:`stdistill.io._section`)."""

from ._image import ImageReader, open_image, write_pyramid_tiff
from ._section import (
    PATIENT_KEY,
    SECTION_KEY,
    SPATIAL_KEY,
    concat,
    has_image,
    image,
    microns_per_pixel,
    new_section,
    sections,
    spatial_um,
    subset_sections,
)
from ._spots import read_spots
from .h5ad import read_h5ad, validate, write_h5ad
from .hest import read_hest
from .legacy_st import read_legacy_st
from .spatialdata import to_spatialdata
from .summary import load_any, summarise
from .visium import read_visium

__all__ = [
    "PATIENT_KEY",
    "SECTION_KEY",
    "SPATIAL_KEY",
    "ImageReader",
    "concat",
    "has_image",
    "image",
    "load_any",
    "microns_per_pixel",
    "new_section",
    "open_image",
    "write_pyramid_tiff",
    "read_h5ad",
    "read_hest",
    "read_legacy_st",
    "read_spots",
    "read_visium",
    "sections",
    "spatial_um",
    "subset_sections",
    "summarise",
    "to_spatialdata",
    "validate",
    "write_h5ad",
]
