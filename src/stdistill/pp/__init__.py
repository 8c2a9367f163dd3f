"""Preprocessing: patches at a physical size, H&E-only tiling, spatial neighbours, patient-level splits."""

from .patches import PatchDataset, patches
from .splits import Fold, check_patient_disjoint, check_split, folds

__all__ = ["PatchDataset", "patches", "Fold", "check_patient_disjoint", "check_split", "folds"]
