"""The niche student in parts: settings (``_config``), data (``_data``), training (``_train``),
choices on the training patients (``_select``) and the estimator (``_model``)."""

from ._config import FEATURE_NORMS, NicheStudentConfig
from ._data import normalise_features
from ._model import NicheStudent

__all__ = ["FEATURE_NORMS", "NicheStudent", "NicheStudentConfig", "normalise_features"]
