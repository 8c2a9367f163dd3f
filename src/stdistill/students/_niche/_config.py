"""The niche student's settings (:class:`NicheStudentConfig`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..._defaults import N_NEIGHBORS
from ..._errors import StdistillError
from ..._keys import Key
from .._refine import DEFAULT_REFINE_GRID

__all__ = ["FEATURE_NORMS", "MONITORS", "NicheStudentConfig"]

FEATURE_NORMS = ("section", "global")
MONITORS = ("val_err", "val_loss", "val_ari")
#: settings that change how training runs, not what it learns (left out of checkpoint fingerprints)
ENGINEERING = ("accelerator", "num_threads", "connectivity_key")


@dataclass
class NicheStudentConfig:
    """Settings of a :class:`~stdistill.students.NicheStudent` (see its docstring for each one).

    ``accelerator``: where Lightning trains (``"cpu"``, ``"gpu"``, ``"auto"``; was ``device``).
    ``connectivity_key``: the ``obsp`` spot graph read when it was supplied by the user (see
    :func:`stdistill.pp.spot_graph`); a radius graph of stdistill's own is not needed: tokens are
    the spots within ``radius_um``.
    """

    n_niches: int | None = None  # K; None: from the teacher's probabilities at fit
    feature_key: str = "X_effnet-lite0-imagenet"  # obsm (n_obs, F) patch features
    radius_um: float | None = None  # neighbourhood, um; None: the radius holding n_neighbors spots
    n_neighbors: int = N_NEIGHBORS
    max_neighbors: int | None = None  # tokens besides the centre; None: the most seen in training (<= 48)
    d_model: int = 32  # transformer width, layers, heads
    n_layers: int = 2
    summary_token: bool = True
    n_heads: int = 4
    dropout: float = 0.1
    token_drop: float = 0.1  # share of neighbour tokens dropped while training
    temperature: float = 2.0  # KD temperature T (KL x T^2) and the hard cross-entropy share
    hard_weight: float = 0.0
    lr: float = 1e-3  # AdamW
    weight_decay: float = 0.05
    batch_size: int = 128  # spots per step (split over DDP processes)
    max_epochs: int = 60  # early stopping: at most, at least (refit), patience, on monitor
    min_epochs: int = 3
    monitor: str = "val_ari"
    patience: int = 8
    feature_norm: str = "section"  # z-score features per section or with the training mean/sd
    n_pcs: int | None = 64  # PCA of the normalised features (fitted on training spots); None: whole
    val_patients: str | list[str] | None = "smallest"  # "smallest", "each", ids, None
    val_block: float = 0.2  # one training patient: share of each section held out as a band
    views: bool = False  # train on obsm[feature_key + "_views"] too
    refit: bool = True  # retrain on all training spots for the chosen epochs
    context_key: str | None = None  # obsm (n_obs, F) features of a larger field of view: one token
    refine_grid: list[dict] | None = None  # refinements tried on the validation split; None: the default grid
    encoder: str | None = None  # how the features were made (predict extracts missing ones)
    size_um: float = 112.0
    px: int = 224
    seed: int = 0
    accelerator: str = "cpu"  # Lightning's default device for fit
    num_threads: int | None = 1  # torch CPU threads while training; None: torch's setting
    connectivity_key: str = Key.obsp.spatial_connectivities  # obsp spot graph (a user's: the neighbourhoods)

    def __post_init__(self):
        if self.feature_norm not in FEATURE_NORMS:
            raise StdistillError(f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        if self.radius_um is not None and self.radius_um < 0:
            raise StdistillError(f"radius_um must be >= 0 (micrometres), got {self.radius_um}")
        if self.temperature <= 0:
            raise StdistillError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.hard_weight <= 1:
            raise StdistillError(f"hard_weight must be in [0, 1], got {self.hard_weight}")
        if self.monitor not in MONITORS:
            raise StdistillError(f'monitor must be "val_err" (niche-id error), "val_ari" or "val_loss" (KD loss), '
                                 f"got {self.monitor!r}")
        if self.d_model % self.n_heads:
            raise StdistillError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.encoder is None and self.feature_key.startswith("X_"):
            self.encoder = self.feature_key[2:]
        self.radius_um = None if self.radius_um is None else float(self.radius_um)
        self.n_pcs = None if self.n_pcs is None else int(self.n_pcs)
        for k in ("n_neighbors", "d_model", "n_layers", "n_heads", "batch_size", "max_epochs", "min_epochs", "patience",
                  "px", "seed"):
            setattr(self, k, int(getattr(self, k)))
        for k in ("dropout", "token_drop", "temperature", "hard_weight", "lr", "weight_decay", "val_block", "size_um"):
            setattr(self, k, float(getattr(self, k)))
        for k in ("summary_token", "views", "refit"):
            setattr(self, k, bool(getattr(self, k)))
        self.refine_grid = [dict(g) for g in (DEFAULT_REFINE_GRID if self.refine_grid is None else self.refine_grid)]

    def as_dict(self) -> dict:
        """Every setting, in the order of the fields (plain, JSON-able values)."""
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_saved(cls, params: dict, path=None) -> NicheStudentConfig:
        """The config of a saved ``params`` dict (older bundles: ``device`` for ``accelerator``)."""
        p = dict(params)
        if "device" in p:
            p.setdefault("accelerator", p.pop("device"))
        unknown = sorted(set(p) - set(cls.names()))
        if unknown:
            raise StdistillError(f"config.json has parameters this version does not know ({unknown})", path)
        return cls(**p)
