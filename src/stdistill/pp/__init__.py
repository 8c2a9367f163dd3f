"""Preprocessing: patches at a physical size, stain normalisation and augmentation, H&E-only tiling, spatial neighbours,
patient-level (and, weaker, spatial) splits, pathway scores."""

from ._augment import PatchAugment
from ._pathways import genesets, pathway_scores, read_gmt
from ._stain import STAIN_METHODS, StainNormalizer, estimate_stain, normalize_stain
from .genes import hest_genes, log1p_targets, read_gene_list
from .neighbors import (
    NeighborTokens,
    aggregate_neighbors,
    neighbor_tokens,
    radius_for_neighbors,
    radius_key,
    spatial_neighbors,
    spot_graph,
    stored_graph,
    user_graph,
)
from .patches import PatchDataset, patches
from .splits import Fold, SpotFold, WeakSplitWarning, check_patient_disjoint, check_split, folds, spatial_folds
from .tile import tile, tissue_mask

__all__ = ["PatchDataset", "patches", "Fold", "SpotFold", "WeakSplitWarning", "check_patient_disjoint", "check_split",
           "folds", "spatial_folds",
           "NeighborTokens", "aggregate_neighbors", "neighbor_tokens", "radius_for_neighbors", "radius_key", "spatial_neighbors",
           "spot_graph", "stored_graph", "user_graph",
           "hest_genes", "log1p_targets", "read_gene_list", "tile", "tissue_mask",
           "genesets", "pathway_scores", "read_gmt",
           "STAIN_METHODS", "StainNormalizer", "estimate_stain", "normalize_stain", "PatchAugment"]
