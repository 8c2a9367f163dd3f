"""Preprocessing: patches at a physical size, stain normalisation and augmentation, H&E-only tiling, spatial neighbours,
patient-level splits, pathway scores."""

from .patches import PatchDataset, patches
from .splits import Fold, check_patient_disjoint, check_split, folds
from .tile import tile, tissue_mask
from .genes import hest_genes, log1p_targets, read_gene_list
from .neighbors import NeighborTokens, aggregate_neighbors, neighbor_tokens, radius_for_neighbors, spatial_neighbors
from ._pathways import genesets, pathway_scores, read_gmt
from ._stain import STAIN_METHODS, StainNormalizer, estimate_stain, normalize_stain
from ._augment import PatchAugment

__all__ = ["PatchDataset", "patches", "Fold", "check_patient_disjoint", "check_split", "folds",
           "NeighborTokens", "aggregate_neighbors", "neighbor_tokens", "radius_for_neighbors", "spatial_neighbors",
           "hest_genes", "log1p_targets", "read_gene_list", "tile", "tissue_mask",
           "genesets", "pathway_scores", "read_gmt",
           "STAIN_METHODS", "StainNormalizer", "estimate_stain", "normalize_stain", "PatchAugment"]
