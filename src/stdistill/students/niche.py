"""The histology-only niche student: a small transformer over a spot's patch features and its
neighbours' patch features within a radius (um), distilled from a niche teacher's soft labels.

Tokens: the centre patch and its neighbours (up to ``max_neighbors``, nearest first), each
``LayerNorm -> Linear`` of its patch feature plus a learned encoding of its offset from the
centre (an MLP of (dx, dy) / radius, so any spot pitch or tile grid works) and, for the centre,
a learned centre embedding. A transformer encoder mixes them; the centre token's output gives K
logits. Loss: :func:`stdistill.losses.distillation_loss` (temperature-scaled KL x T^2, plus an
optional hard cross-entropy share). Training augments with random rotations/flips of the offsets
(tissue orientation is arbitrary) and neighbour-token dropout.

Early stopping uses a validation patient taken from the training patients (never the test
fold); with a single training patient it warns and holds out a contiguous spatial block of each
training section instead. With ``refit=True`` the model is then retrained on all training spots
for the chosen number of epochs. With ``views=True`` each training epoch draws every spot's
feature from its clean and augmented views (``obsm[feature_key + "_views"]``, from
``features.extract(views=K)``).

The code lives in :mod:`stdistill.students._niche` (settings, data, training, selection, the
estimator); this module is its public path.
"""

from __future__ import annotations

from ._niche import FEATURE_NORMS, NicheStudent, NicheStudentConfig, normalise_features

__all__ = ["FEATURE_NORMS", "NicheStudent", "NicheStudentConfig", "normalise_features"]
