"""Transfer settings of the niche student chosen on validation patients inside the training patients.

A *transfer setting* is a dict over three switches: ``stain_norm`` (None or a stain method, e.g.
``"macenko"``: features of stain-normalised patches), ``views`` (train on augmented views) and
``context`` (a larger field of view as one extra token). :func:`fit_transfer` extracts what every
candidate needs on the **training** sections only (through the feature cache, so a second run
reads it back), then lets :meth:`NicheStudent.fit` (its ``candidates``) train one student per
candidate on the training patients minus the validation patient, score ARI against the teacher
there, keep the best (ties: the simpler) and refit on all training patients. The choice and the
per-candidate scores go to ``info_["transfer"]``, saved in the bundle
(``config.json`` ``bundle.training.transfer``); prediction extracts the chosen features as the
training ones were made (stain normalisation onto the stored training reference, context size).
"""

from __future__ import annotations

import os

import anndata as ad

from .._errors import StdistillError
from .._keys import Key

#: the switches of a transfer setting and their "off" values
TRANSFER_OFF = {"stain_norm": None, "views": False, "context": False}
#: ``transfer="auto"``: every combination of Macenko normalisation, augmented views and context, simplest first
DEFAULT_TRANSFER_GRID = [
    {}, {"stain_norm": "macenko"}, {"views": True}, {"context": True},
    {"stain_norm": "macenko", "views": True}, {"stain_norm": "macenko", "context": True}, {"views": True, "context": True},
    {"stain_norm": "macenko", "views": True, "context": True},
]


def transfer_grid(transfer: str | list[dict]) -> list[dict]:
    """Full settings (every switch named) of ``transfer`` (``"auto"``: :data:`DEFAULT_TRANSFER_GRID`,
    or a list of dicts), ordered simplest first (fewest switches on; stable), so that ties go to the
    simpler setting."""
    from ..pp._stain import check_method

    grid = DEFAULT_TRANSFER_GRID if transfer == "auto" else transfer
    if isinstance(grid, str) or not isinstance(grid, (list, tuple)) or not grid:
        raise StdistillError(f"transfer must be 'auto' or a non-empty list of settings dicts, got {transfer!r}")
    out = []
    for g in grid:
        bad = set(g) - set(TRANSFER_OFF) if isinstance(g, dict) else {"<not a dict>"}
        if bad:
            raise StdistillError(f"transfer setting {g!r}: unknown switches {sorted(bad)} (known: {sorted(TRANSFER_OFF)})")
        full = {**TRANSFER_OFF, **g}
        full["stain_norm"] = None if full["stain_norm"] in (None, "none") else check_method(full["stain_norm"])
        full["views"], full["context"] = bool(full["views"]), bool(full["context"])
        if full not in out:
            out.append(full)
    return sorted(out, key=lambda g: sum(v not in (None, False) for v in g.values()))


def parse_transfer(text: str | None) -> str | list[dict] | None:
    """The CLI's ``--transfer``: ``none`` (None), ``auto``, or a comma list of settings, each
    ``plain`` or switches joined by ``+`` (``macenko``, ``reinhard``, ``views``, ``context``),
    e.g. ``plain,macenko,macenko+context``."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    if text.strip().lower() == "auto":
        return "auto"
    out = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        g: dict = {}
        for part in (q for q in item.split("+") if q and q != "plain"):
            if part in ("views", "context"):
                g[part] = True
            elif part in ("macenko", "reinhard"):
                g["stain_norm"] = part
            else:
                raise StdistillError(f"--transfer: unknown switch {part!r} in {item!r} (use plain, macenko, reinhard, "
                                     "views, context joined by '+', settings separated by ',', or 'auto')")
        out.append(g)
    return transfer_grid(out)


def describe(setting: dict) -> str:
    """``"macenko+context"`` for a setting (``"plain"`` with every switch off); the inverse of
    :func:`parse_transfer`'s items."""
    parts = [setting["stain_norm"]] if setting.get("stain_norm") else []
    parts += [k for k in ("views", "context") if setting.get(k)]
    return "+".join(parts) or "plain"


def describe_choice(record: dict) -> str:
    """One line of an ``info_["transfer"]`` record: the chosen setting, where, and every score."""
    scores = ", ".join(f"{describe(r)} {r['val_score']:.3f}" for r in record["selection"])
    return f"{describe(record['chosen'])} on {record['val_patients']} ({record['monitor']}: {scores})"


def _context_um(made: dict, context_um: float | None) -> float:
    """The context field of view (um): ``context_um``, or twice the patch of the ``made`` record."""
    return float(context_um) if context_um else 2 * float(made["size_um"])


def _keys(feature_key: str, setting: dict) -> tuple[str, str | None]:
    """(feature key, context key or None) of a setting."""
    key = feature_key if setting["stain_norm"] is None else f"{feature_key}_{setting['stain_norm']}"
    return key, (f"{key}_ctx" if setting["context"] else None)


def candidate_features(
    adata: ad.AnnData,
    feature_key: str,
    grid: list[dict],
    *,
    n_views: int = 2,
    view_seed: int = 0,
    context_um: float | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Extract on ``adata`` (training sections only) what each setting of ``grid`` needs, through
    the feature cache, and return each setting's :class:`NicheStudent` overrides (``feature_key``,
    ``views``, ``context_key``).

    Encoder, patch size and precision are those of ``uns["features"][feature_key]`` (plain,
    unnormalised features). Stain-normalised features go to ``obsm[feature_key + "_<method>"]``,
    the reference being the first imaged section here; augmented views (``n_views``, seeded by
    ``view_seed``) to ``obsm[<key> + "_views"]``; context features (``context_um``, default twice
    the patch) to ``obsm[<key> + "_ctx"]``.
    """
    from ..features import run_extraction

    made = adata.uns.get(Key.uns.features, {}).get(feature_key)
    if not made or not made.get("encoder"):
        raise StdistillError(f'transfer settings need obsm["{feature_key}"] made by stdistill.features.extract '
                             f'(uns["features"]["{feature_key}"] names the encoder and patch)')
    if made.get("stain"):
        raise StdistillError(f'obsm["{feature_key}"] is stain-normalised already ({made["stain"]["method"]}); transfer '
                             "settings start from plain features")
    base = {"size_um": float(made["size_um"]), "px": int(made["px"]), "precision": made.get("precision") or "fp32",
            "cache_dir": cache_dir, "device": device}
    ctx_um = _context_um(made, context_um)
    for stain in dict.fromkeys(g["stain_norm"] for g in grid):
        of = [g for g in grid if g["stain_norm"] == stain]
        key, _ = _keys(feature_key, of[0])
        views = n_views if any(g["views"] for g in of) else 0
        if stain is not None or views:
            run_extraction(adata, made["encoder"], **base, stain_norm=stain, views=views, view_seed=view_seed,
                           key_added=key)
        if any(g["context"] for g in of):
            run_extraction(adata, made["encoder"], **{**base, "size_um": ctx_um}, stain_norm=stain, key_added=f"{key}_ctx")
    out = []
    for g in grid:
        key, ctx = _keys(feature_key, g)
        out.append({"feature_key": key, "views": g["views"], "context_key": ctx})
    return out


def fit_transfer(
    adata: ad.AnnData,
    feature_key: str,
    transfer: str | list[dict] = "auto",
    *,
    probs_key: str = Key.obsm.niche_probs,
    student_kwargs: dict | None = None,
    n_views: int = 2,
    view_seed: int = 0,
    context_um: float | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
    device: str = "cpu",
    **fit_kwargs,
):
    """A :class:`~stdistill.students.NicheStudent` with its transfer setting chosen on a validation
    patient inside ``adata`` (the training patients only; never pass the test patient).

    Parameters
    ----------
    adata
        Training sections with images, teacher probabilities ``obsm[probs_key]`` and plain patch
        features ``obsm[feature_key]`` (from :func:`stdistill.features.extract`).
    transfer
        ``"auto"`` (:data:`DEFAULT_TRANSFER_GRID`) or a list of settings dicts over
        ``{"stain_norm": None | "macenko" | "reinhard", "views": bool, "context": bool}``.
    student_kwargs
        Other :class:`NicheStudent` parameters (``n_niches``, ``seed``, ``max_epochs`` ...).
    n_views, view_seed, context_um, cache_dir, device
        Extraction of the candidates' features (:func:`candidate_features`).
    fit_kwargs
        Passed to :meth:`NicheStudent.fit` (``run_dir``, ``devices`` ...).

    Returns
    -------
    The fitted student; ``info_["transfer"]``: ``chosen`` (the setting), ``selection`` (per
    setting: ``val_score``, the best ``monitor`` value on the validation patient, i.e. ARI against
    the teacher by default, and its epoch), ``val_patients``, ``n_views``, ``context_um``, the
    stain reference section; saved in the bundle (``bundle.training.transfer``).
    """
    from ..students.niche import NicheStudent

    grid = transfer_grid(transfer)
    skw = dict(student_kwargs or {})
    if any(k in skw for k in ("views", "context_key")):
        raise StdistillError("views / context_key are chosen by transfer=; leave them out of student_kwargs")
    overrides = candidate_features(adata, feature_key, grid, n_views=n_views, view_seed=view_seed, context_um=context_um,
                                   cache_dir=cache_dir, device=device)
    made = adata.uns[Key.uns.features][feature_key]
    skw.setdefault("encoder", made["encoder"])
    student = NicheStudent(feature_key=feature_key, **skw)
    student.fit(adata, probs_key=probs_key, candidates=overrides, **fit_kwargs)
    scores = student.selection_.scores()  # ARI in its own sign (the student minimises -ARI)
    selection = [dict(g, val_score=float(r["score"]), best_epoch=int(r["epoch"]))
                 for g, (_, r) in zip(grid, scores.iterrows())]
    chosen = grid[student.selection_.choice["candidate"]]
    student.info_["transfer"] = {
        "chosen": chosen, "selection": selection, "monitor": student.config.monitor,
        "val_patients": student.info_.get("val_patients"), "n_views": int(n_views), "view_seed": int(view_seed),
        "context_um": _context_um(made, context_um),
        "stain_reference_section": (student.info_.get("features") or {}).get("stain", {}).get("reference_section"),
    }
    return student
