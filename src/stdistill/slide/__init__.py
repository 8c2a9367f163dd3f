"""Whole-slide prediction with any trained student (bundle): tissue tiles, streamed and resumable
chunks, and outputs a pathologist opens (PNG maps, .h5ad, QuPath GeoJSON)."""

from ._export import PALETTE, niche_map, value_map, write_geojson
from ._run import SlideRun, predict_slide

__all__ = ["PALETTE", "SlideRun", "niche_map", "predict_slide", "value_map", "write_geojson"]
