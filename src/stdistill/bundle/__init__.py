"""Model bundles: the one format of every trained estimator, whatever the recipe.

A bundle is a folder: ``config.json`` + ``model.safetensors`` (nothing pickled). ``config.json``
holds ``"format"`` (which estimator reads it), the ``"bundle"`` record and the estimator's own
settings. The record (:func:`bundle_record`): schema, ``recipe`` (``"niches"``, ``"peka"``,
``"stamp"``, ``"probe"``, ``"genst"``, ``"survival"``, ``"niche_teacher"``,
``"expression_teacher"``), stdistill version, the encoder (registry name, weights digest, licence),
the patch (``size_um`` micrometres, ``px`` pixels), precision, feature normalisation, the
``uns["features"]`` record of the training features (stain normalisation and its reference)
for models that read encoder features, output names and a training summary.

The protocol: an estimator class sets ``_bundle_format`` (a key of this package's own table of
readers) and has two methods; this package writes and reads the files, checks them and raises
the errors.

``_bundle_parts(self) -> (config, tensors, record)``
    ``config``: JSON-able settings and fitted non-array state (not the keys ``"format"`` or
    ``"bundle"``); ``tensors``: ``{name: torch.Tensor | np.ndarray}`` (dtypes kept exactly);
    ``record``: :func:`bundle_record`.
``_from_bundle(cls, config, tensors, record, path, *, device="cpu", encoder=None, **load_kw)``
    (classmethod) rebuild the fitted estimator from what :meth:`_bundle_parts` gave (tensors come
    back as CPU torch tensors; a missing key is a StdistillError naming ``path``); check shapes
    with :func:`check_shapes` or ``_utils.load_state``.

``save(path)`` of every estimator is :func:`save_bundle` and ``load(path)`` is
:func:`load_bundle` (``expect=`` the class), both given by the :class:`Bundled` mixin. Writing is atomic (a temporary sibling folder renamed
into place). Loading imports only modules of our own table, never one named in a file.
"""

from .._niches import niche_names
from ._format import SCHEMA, Bundle, bundle_record, check_record
from ._io import Bundled, check_shapes, check_target, load_bundle, save_bundle

__all__ = ["SCHEMA", "Bundle", "Bundled", "bundle_record", "check_record", "check_shapes", "check_target", "load_bundle",
           "niche_names", "save_bundle"]
