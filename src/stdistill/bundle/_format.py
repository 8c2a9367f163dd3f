"""The bundle record, its feature check, and one loader for every recipe's saved model."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from .._errors import StdistillError

SCHEMA = "stdistill.bundle/1"
#: saved-model format -> "module:Class" of the estimator that reads it
_READERS = {
    "stdistill.NicheStudent/1": "stdistill.students.niche:NicheStudent",
    "stdistill.PEKA/1": "stdistill.recipes._peka:PEKA",
    "stdistill.STAMP/1": "stdistill.recipes._stamp:STAMP",
}


def bundle_record(
    recipe: str,
    *,
    encoder: str | None,
    weights_digest: str | None,
    size_um: float,
    px: int,
    precision: str | None = None,
    feature_norm: str | None = None,
    outputs: dict[str, list[str]] | None = None,
    training: dict | None = None,
    licence: str | None = None,
) -> dict:
    """The ``"bundle"`` entry of a model's ``config.json`` (JSON types only).

    ``size_um`` is the patch side in micrometres, ``px`` its side in pixels; ``outputs`` maps an
    output kind (``"niches"``, ``"genes"``, ``"pathways"``) to its names in output order.
    """
    from .. import __version__

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
        "patch": {"size_um": float(size_um), "px": int(px)},
        "precision": precision,
        "feature_norm": feature_norm,
        "outputs": {k: [str(x) for x in v] for k, v in (outputs or {}).items()},
        "training": _jsonable(training or {}),
    }


def _jsonable(x: Any) -> Any:
    """``x`` with NumPy scalars/arrays turned into plain JSON types."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def check_record(record: dict, made: dict | None, what: str, path: str | os.PathLike | None = None) -> None:
    """Refuse features ``made`` another way than the bundle ``record`` says (one-line error).

    ``made`` is an ``uns["features"][key]`` entry (encoder, size_um, px, weights_digest); ``None``
    (features of unknown origin) passes. Compared: encoder name, patch size (um) and px, and the
    weights digest when both sides know it.
    """
    if not made:
        return
    enc, patch = record["encoder"], record["patch"]
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


def niche_names(adata: ad.AnnData, key: str = "niche", n_genes: int = 3) -> list[str] | None:
    """Niche labels ``"<id>: GENE1/GENE2/GENE3"`` from the teacher's spots: the genes whose mean
    log1p(counts per 10k) in the niche exceeds the other spots' the most. ``None`` without genes
    or without ``obs[key]``. The niche number is kept first so maps and tables stay comparable."""
    import scipy.sparse as sp

    if key not in adata.obs or adata.n_vars == 0:
        return None
    lab = adata.obs[key]
    cats = [str(c) for c in (lab.cat.categories if hasattr(lab, "cat") else sorted(lab.dropna().unique()))]
    X = adata.X.tocsr() if sp.issparse(adata.X) else sp.csr_matrix(np.asarray(adata.X))
    tot = np.asarray(X.sum(1)).ravel()
    tot[tot == 0] = 1
    L = sp.diags(1e4 / tot) @ X
    L.data = np.log1p(L.data)
    lab = lab.astype(str).to_numpy()
    names = []
    for c in cats:
        m = lab == c
        if not m.any() or m.all():
            names.append(c)
            continue
        diff = np.asarray(L[m].mean(0)).ravel() - np.asarray(L[~m].mean(0)).ravel()
        top = np.argsort(-diff, kind="stable")[:n_genes]
        names.append(f"{c}: " + "/".join(str(adata.var_names[i]) for i in top))
    return names


def _reader(fmt: str | None, path: Path):
    if fmt not in _READERS:
        raise StdistillError(f"not a stdistill model bundle (format {fmt!r}; known: {sorted(_READERS)})", path)
    mod, cls = _READERS[fmt].split(":")
    return getattr(importlib.import_module(mod), cls)


def _format_of(path: Path) -> str | None:
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise StdistillError("not a model bundle (config.json missing)", path)
        try:
            return json.loads(cfg.read_text()).get("format")
        except (ValueError, OSError) as e:
            raise StdistillError(f"config.json is unreadable ({e})", path) from None
    if path.suffix == ".safetensors" and path.is_file():  # the older single-file PEKA/STAMP models
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return (fh.metadata() or {}).get("format")
        except Exception as e:  # noqa: BLE001 - corrupt files
            raise StdistillError(f"not a readable safetensors file ({type(e).__name__})", path) from None
    raise StdistillError("no such model bundle (expected a folder with config.json + model.safetensors)", path)


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

    @property
    def size_um(self) -> float:
        """Patch side in micrometres."""
        return float(self.record["patch"]["size_um"])

    @property
    def px(self) -> int:
        """Patch side in pixels."""
        return int(self.record["patch"]["px"])

    @property
    def outputs(self) -> dict[str, list[str]]:
        return self.record["outputs"]

    def check_features(self, adata: ad.AnnData, key: str) -> None:
        """Refuse ``adata.obsm[key]`` when ``uns["features"][key]`` says it was made otherwise."""
        check_record(self.record, adata.uns.get("features", {}).get(key), f'obsm["{key}"]', self.path)


def load_bundle(path: str | os.PathLike, *, device: str = "cpu", encoder=None) -> Bundle:
    """Load any saved student: a bundle folder (niches, PEKA, STAMP) or an older PEKA/STAMP
    ``.safetensors`` file. ``encoder``: a name or loaded Encoder for adapted-encoder models whose
    encoder is not in the registry. Raises StdistillError naming ``path`` when it is not one."""
    path = Path(path)
    cls = _reader(_format_of(path), path)
    if cls.__name__ == "NicheStudent":
        model = cls.load(path, device=device)
    else:
        model = cls.load(path, encoder=encoder, device=device)
    return Bundle(path, model, model.bundle_record())


def save_bundle(model, path: str | os.PathLike) -> Path:
    """Write a fitted student (NicheStudent, PEKA, STAMP) as a bundle folder; returns ``path``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raise StdistillError("a bundle is a folder; give a path without the .safetensors suffix", path)
    if not hasattr(model, "bundle_record"):
        raise StdistillError(f"{type(model).__name__} cannot be saved as a bundle")
    return model.save(path)
