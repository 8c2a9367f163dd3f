"""AMKD: slide-level survival from H&E alone, distilled from a pathology + genomics teacher.

No public code exists; this is built from the paper's description (Xu et al., 2026,
doi:10.70401/cbm.2026.0015), each choice documented in docs/survival.md:

- a **multimodal teacher** (:class:`SurvivalModel` with ``kind="gge"``): instance features of the
  slide(s) + the bulk transcriptome grouped into gene families (MSigDB Hallmark); its
  **gene-guided enhancement module** lets one token per gene family attend over the instances
  (MCAT-style co-attention) and pools the resulting gene-guided pathology tokens into an
  *enhanced pathology feature*;
- an **H&E-only student** (``kind="student"``: gated-attention ABMIL) trained with the survival
  loss + feature distillation to the teacher's enhanced feature + the **adaptive redundancy
  reduction** loss (our reading: student-teacher cross-correlation driven to the identity, each
  sample weighted by the teacher-student prediction discrepancy); patients without RNA train the
  student's pathology path and head and stay out of the distillation terms;
- baselines (ABMIL, SNN, late fusion) and ablations (:func:`amkd_methods`), evaluated by
  :func:`survival_cv` on patient-level folds with settings chosen on inner patients
  (:func:`select_survival`).

Survival losses: MCAT/SurvPath's discrete-time NLL with bins fitted on the training fold, or Cox
(torchsurv). Needs the optional extra: ``pip install 'stdistill[survival]'``.
"""

from ...io._cohort import (
                      Cohort,
                      cohort_from_tiles,
                      find_bags,
                      read_bag,
                      read_clinical,
                      read_cohort,
                      read_rna,
)
from ._cv import (
                      Method,
                      amkd,
                      amkd_methods,
                      cv_table,
                      mask_rna,
                      patient_folds,
                      select_survival,
                      survival_cv,
)
from ._losses import (
                      cox_loss,
                      discrepancy_weights,
                      fit_time_bins,
                      nll_loss,
                      nll_risk,
                      redundancy_reduction,
                      time_to_bin,
                      whitened_redundancy,
)
from ._model import SurvivalConfig, SurvivalModel
from ._module import SurvivalModule

__all__ = ["Cohort", "Method", "SurvivalConfig", "SurvivalModel", "SurvivalModule", "amkd", "amkd_methods",
           "cohort_from_tiles", "cox_loss", "cv_table", "discrepancy_weights", "find_bags", "fit_time_bins",
           "mask_rna", "nll_loss", "nll_risk", "patient_folds", "read_bag", "read_clinical", "read_cohort", "read_rna",
           "redundancy_reduction", "select_survival", "survival_cv", "time_to_bin",
           "whitened_redundancy"]
