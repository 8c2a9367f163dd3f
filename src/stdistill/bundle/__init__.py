"""Model bundles: one folder per trained student, whatever the recipe.

A bundle is ``config.json`` + ``model.safetensors`` (nothing pickled). ``config.json`` holds the
recipe's own settings plus a ``"bundle"`` record: schema, recipe, stdistill version, the encoder
(registry name, weights digest, licence), patch geometry (``size_um`` micrometres, ``px`` pixels),
precision, feature normalisation, output names (niches or genes) and a training summary.

:func:`load_bundle` reads any bundle (and the older single-file PEKA/STAMP models) and
:meth:`Bundle.check_features` refuses features made another way, with one line.
"""

from ._format import (
    SCHEMA,
    Bundle,
    bundle_record,
    check_record,
    load_bundle,
    niche_names,
    save_bundle,
)

__all__ = ["SCHEMA", "Bundle", "bundle_record", "check_record", "load_bundle", "niche_names", "save_bundle"]
