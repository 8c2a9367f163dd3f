"""Whole-slide prediction with any trained student (bundle): tissue tiles, streamed and resumable
chunks read in worker processes, and outputs a pathologist opens (PNG maps, .h5ad, QuPath
GeoJSON); one slide, an open reader, a LazySlide ``WSIData``, or a whole cohort."""

from ._cohort import CohortRun, list_slides, merge_summary, predict_cohort
from ._export import PALETTE, niche_map, value_map, write_geojson
from ._run import SlideRun, predict_slide

__all__ = ["PALETTE", "CohortRun", "SlideRun", "list_slides", "merge_summary", "niche_map", "predict_cohort",
           "predict_slide", "value_map", "write_geojson"]
