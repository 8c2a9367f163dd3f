"""Preprocessing: patches at a physical size, H&E-only tiling, spatial neighbours, patient-level splits, pathway scores."""

from ._pathways import genesets, pathway_scores, read_gmt
from .genes import hest_genes, log1p_targets, read_gene_list
from .neighbors import (
           NeighborTokens,
           aggregate_neighbors,
           neighbor_tokens,
           radius_for_neighbors,
           spatial_neighbors,
)
from .patches import PatchDataset, patches
from .splits import (
           Fold,
           SpotFold,
           WeakSplitWarning,
           check_patient_disjoint,
           check_split,
           folds,
           spatial_folds,
)
from .tile import tile, tissue_mask

__all__ = ["PatchDataset", "patches", "Fold", "SpotFold", "WeakSplitWarning", "check_patient_disjoint", "check_split", "folds", "spatial_folds",
           "NeighborTokens", "aggregate_neighbors", "neighbor_tokens", "radius_for_neighbors", "spatial_neighbors",
           "hest_genes", "log1p_targets", "read_gene_list", "tile", "tissue_mask",
           "genesets", "pathway_scores", "read_gmt"]
