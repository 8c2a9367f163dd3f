"""Readers and writers, and the section data model (see :mod:`stdistill.io._section`)."""

from ._image import ImageReader, open_image
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

__all__ = [
    "PATIENT_KEY",
    "SECTION_KEY",
    "SPATIAL_KEY",
    "ImageReader",
    "concat",
    "has_image",
    "image",
    "microns_per_pixel",
    "new_section",
    "open_image",
    "sections",
    "spatial_um",
    "subset_sections",
]
