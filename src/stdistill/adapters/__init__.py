"""Adapted image encoders shared by the recipes (PEKA, STAMP, ...).

- **cut** (:func:`parse_cut`, :func:`default_train_from`): where the encoder splits into a frozen
  trunk and a trainable tail;
- **peft adapters** (:func:`add_adapter`, :func:`adapter_targets`, :class:`Pointwise`): MiSS
  (block-affine) or LoRA on the tail's modules;
- **trunk cache** (:func:`trunk_activations`): frozen activations at the cut, computed once per
  section, bounded in memory, kept on disk;
- **training** (:class:`TailModule`, :class:`AdaptedEncoder`): the Lightning loop and the
  estimator a recipe subclasses with its losses and heads.
"""

from ._config import ADAPTER_KEYS, AdapterConfig
from ._cut import Cut, arch, default_train_from, parse_cut, tail_blocks
from ._estimator import AdaptedEncoder, as_input
from ._module import AdaptedNet, TailModule, mean_pearson, ridge_init, trainable_key, val_curve
from ._peft import Pointwise, adapter_targets, add_adapter, is_adapter_key
from ._trunk import Tail, clear_trunk_cache, dihedral, stain_reference, trunk, trunk_activations

__all__ = ["ADAPTER_KEYS", "AdaptedEncoder", "AdaptedNet", "AdapterConfig", "Cut", "Pointwise", "Tail", "TailModule", "adapter_targets",
           "add_adapter", "arch", "as_input", "clear_trunk_cache", "default_train_from", "dihedral", "is_adapter_key",
           "mean_pearson", "parse_cut", "ridge_init", "stain_reference", "tail_blocks", "trainable_key", "trunk", "trunk_activations", "val_curve"]
