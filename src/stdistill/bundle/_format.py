"""The bundle record, its feature check and the loaded :class:`Bundle` (files: ``_io``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from .._errors import StdistillError
from .._json import jsonable
from .._keys import Key

SCHEMA = "stdistill.bundle/1"


def bundle_record(
    recipe: str,
    *,
    features: dict | None = None,
    encoder: str | None = None,
    weights_digest: str | None = None,
    size_um: float | None = None,
    px: int | None = None,
    precision: str | None = None,
    feature_norm: str | None = None,
    outputs: dict[str, list[str]] | None = None,
    training: dict | None = None,
    licence: str | None = None,
) -> dict:
    """The ``"bundle"`` entry of a model's ``config.json`` (JSON types only).

    ``features``: the ``uns["features"][key]`` record of the training features (encoder, patch,
    precision, weights digest, stain normalisation with its reference) for models that read
    encoder features; the encoder and patch fields default to its values. ``size_um`` is the
    patch side in micrometres, ``px`` its side in pixels (``None``: the model reads no image);
    ``outputs`` maps an output kind (``"niches"``, ``"genes"``, ``"pathways"``, ``"risk"``) to its
    names in output order.
    """
    from .. import __version__

    f = dict(features or {})
    encoder = encoder or f.get("encoder")
    weights_digest = weights_digest or f.get("weights_digest")
    size_um, px = (f.get("size_um") if size_um is None else size_um), (f.get("px") if px is None else px)
    precision, licence = precision or f.get("precision"), licence or f.get("licence")
    if licence is None and encoder:
        try:
            from ..encoders import get_spec

            licence = get_spec(encoder).licence
        except StdistillError:
            licence = None
    return {
        "schema": SCHEMA,
        "recipe": recipe,
        "stdistill_version": __version__,
        "encoder": {"name": encoder, "weights_digest": weights_digest, "licence": licence},
        "patch": None if size_um is None or px is None else {"size_um": float(size_um), "px": int(px)},
        "precision": precision,
        "feature_norm": feature_norm,
        "features": jsonable(f) if f else None,
        "outputs": {k: [str(x) for x in v] for k, v in (outputs or {}).items()},
        "training": jsonable(training or {}),
    }


def check_record(record: dict, made: dict | None, what: str, path: str | os.PathLike | None = None) -> None:
    """Refuse features ``made`` another way than the bundle ``record`` says (one-line error).

    ``made`` is an ``uns["features"][key]`` entry (encoder, size_um, px, weights_digest); ``None``
    (features of unknown origin) passes. Compared: encoder name, patch size (um) and px, and the
    weights digest when both sides know it.
    """
    enc, patch = record["encoder"], record.get("patch")
    if not made or not patch or not enc.get("name"):
        return
    want = f"encoder {enc['name']!r} at {patch['size_um']:g} um / {patch['px']} px"
    got = f"encoder {made.get('encoder')!r} at {float(made.get('size_um', np.nan)):g} um / {made.get('px')} px"
    same = (made.get("encoder") == enc["name"] and np.isclose(float(made.get("size_um", np.nan)), patch["size_um"])
            and int(made.get("px", -1)) == patch["px"])
    if same and enc.get("weights_digest") and made.get("weights_digest") and made["weights_digest"] != enc["weights_digest"]:
        got += f" with other weights ({made['weights_digest'][:12]} != {enc['weights_digest'][:12]})"
        same = False
    if not same:
        raise StdistillError(f"{what} came from {got} but the model was trained on {want}; "
                             f"extract them again with that encoder and patch size", path)


@dataclass
class Bundle:
    """A loaded bundle: the fitted estimator and its ``"bundle"`` record."""

    path: Path
    model: Any
    record: dict

    @property
    def recipe(self) -> str:
        return self.record["recipe"]

    @property
    def encoder(self) -> str:
        return self.record["encoder"]["name"]

    def _patch(self) -> dict:
        if not self.record.get("patch"):
            raise StdistillError(f"this {self.recipe} model records no patch size (it reads no image, or features "
                                 "of unknown origin)", self.path)
        return self.record["patch"]

    @property
    def size_um(self) -> float:
        """Patch side in micrometres."""
        return float(self._patch()["size_um"])

    @property
    def px(self) -> int:
        """Patch side in pixels."""
        return int(self._patch()["px"])

    @property
    def features(self) -> dict | None:
        """The ``uns["features"]`` record of the training features (models that read encoder features)."""
        return self.record.get("features")

    @property
    def outputs(self) -> dict[str, list[str]]:
        return self.record["outputs"]

    def check_features(self, adata: ad.AnnData, key: str) -> None:
        """Refuse ``adata.obsm[key]`` when ``uns["features"][key]`` says it was made otherwise."""
        check_record(self.record, adata.uns.get(Key.uns.features, {}).get(key), f'obsm["{key}"]', self.path)
