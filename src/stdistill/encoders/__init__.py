"""Patch encoders by name: a registry of specs (timm, Hugging Face hub, packages, your own modules).

>>> import stdistill as sd
>>> sd.encoders.list_encoders()              # name, dim, licence, gated, usable offline
>>> enc = sd.encoders.load("effnet-lite0-imagenet")   # the offline default (ImageNet, not pathology)
>>> feats = enc(patches_uint8)               # (B, 3, H, W) uint8 -> (B, 1280) float32

See docs/encoders.md for licences: UNI, UNI2-h, Virchow2 and CONCH are CC-BY-NC-ND-4.0 and their
licences count students distilled from their features as derivatives.
"""

from ._load import Encoder, LicenceWarning, load, read_state_dict
from .registry import (
    EncoderSpec,
    get_spec,
    list_encoders,
    register,
    register_module,
    register_timm,
    unregister,
)

__all__ = [
    "Encoder",
    "EncoderSpec",
    "LicenceWarning",
    "get_spec",
    "list_encoders",
    "load",
    "read_state_dict",
    "register",
    "register_module",
    "register_timm",
    "unregister",
]
