"""Which predictor runs each kind of bundle (:data:`PREDICTORS`), and the checks a bundle must
pass before a slide is opened (:func:`check_bundle`)."""

from __future__ import annotations

from .._errors import StdistillError
from ._frozen import check_survival, predict_genst, predict_probe, predict_survival
from ._models import predict_adapted, predict_niches

#: recipe of a bundle -> its predictor
PREDICTORS = {"niches": predict_niches, "peka": predict_adapted, "stamp": predict_adapted, "probe": predict_probe,
              "genst": predict_genst, "survival": predict_survival}

#: recipes whose predictor makes encoder features from the bundle's features record
_FROM_RECORD = ("probe", "genst", "survival")


def check_bundle(b) -> None:
    """One line for a bundle ``stdistill predict`` cannot run on a slide."""
    if b.recipe not in PREDICTORS:
        raise StdistillError(f"stdistill predict runs {', '.join(sorted(PREDICTORS))} models; this bundle is a "
                             f"{b.recipe!r} model", b.path)
    if b.recipe in _FROM_RECORD and not (b.features and b.features.get("encoder") and b.record.get("patch")):
        raise StdistillError(f"this {b.recipe} model records no encoder and patch size for its features (fitted on "
                             "features of unknown origin, e.g. bag files); fit it on features made by stdistill "
                             "(features extract) to predict slides", b.path)
    if b.recipe == "survival":
        check_survival(b)
