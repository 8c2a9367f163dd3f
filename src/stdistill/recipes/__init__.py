"""Distillation recipes: each composes io/pp/encoders/features/teachers/students/losses/metrics/pl."""

from __future__ import annotations

from .._lazy import attach

# public name -> submodule that defines it (imported on first use, so importing the
# package stays light). Add an entry when you add a public object.
_LAZY: dict[str, str] = {
    "run_niches": "niches",
    **dict.fromkeys(("fit_transfer", "transfer_grid", "DEFAULT_TRANSFER_GRID"), "_niches_transfer"),
    "peka": "_peka",
    "PEKA": "_peka",
    "PekaConfig": "_peka",
    "select_peka": "_peka",
    "choose_peka": "_peka",
    "stamp": "_stamp",
    "STAMP": "_stamp",
    "StampConfig": "_stamp",
    "select_stamp": "_stamp",
    **dict.fromkeys(("Cohort", "SurvivalConfig", "SurvivalModel", "amkd", "amkd_methods", "survival_cv", "select_survival",
                     "patient_folds", "cv_table", "read_cohort", "read_clinical", "read_rna", "cohort_from_tiles"), "_survival"),
    "GenST": "_genst", "GenstConfig": "_genst", "select_genst": "_genst", "codebook_stats": "_genst",
    "genst_patches": "_genst",

}

__getattr__, __all__ = attach(__name__, _LAZY)
