"""Settings shared by every recipe that trains an adapted image encoder (PEKA, STAMP, ...)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .._errors import StdistillError

#: substrings of peft's adapter parameter names (MiSS, LoRA)
ADAPTER_KEYS = ("miss_", "lora_")


@dataclass
class AdapterConfig:
    """Adapter, cut, optimisation and patch settings of one run; recipes subclass it with their losses.

    ``rank=None`` gives MiSS r=128 / LoRA r=64 (about 6% of effnet-lite0's weights trainable with
    the default cut). ``train_from`` is the cut (see :func:`stdistill.adapters.parse_cut`); ``None``
    takes the architecture's default. ``size_um`` (micrometres) and ``px`` (pixels) are the patch
    geometry. ``val_metric`` is the validation score after each epoch: ``"ridge"`` (HEST probe
    Pearson on the validation spots), ``"head"`` (the regression head's Pearson) or ``"mse"``.
    ``stain_norm`` (``"macenko"`` | ``"reinhard"``) stain-normalises every patch before the trunk,
    onto the stain of the training section ``stain_reference`` (default: the first imaged one);
    ``None`` encodes raw patches.
    """

    adapter: str = "miss"  # "miss" | "lora" | "none" (heads only: the frozen-encoder ablation)
    rank: int | None = None
    miss_init: bool | str = True  # MissConfig.init_weights: True | "bat" | "mini"
    mini_r: int = 1
    lora_alpha: float | None = None  # default: = rank (scaling 1)
    train_from: str | None = None  # cut; None: per architecture (effnet: "blocks.6.0.conv_pwl")
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 20
    patience: int = 3
    batch_size: int = 64
    val_metric: str = "ridge"  # "ridge" (HEST probe Pearson on val) | "head" (head Pearson) | "mse"
    size_um: float = 112.0
    px: int = 224
    views: int = 1  # dihedral views of each patch cached through the trunk (training samples one)
    train_positions: int | None = None  # CNN: train on this many random positions of the cached map
    head_ridge: float = 1.0  # heads start at the ridge solution on frozen features, penalty head_ridge x n_spots
    seed: int = 0
    stain_norm: str | None = None  # "macenko" | "reinhard": patches normalised onto a training reference
    stain_reference: str | None = None  # the reference's training section; None: the first imaged one

    def __post_init__(self):
        if self.stain_norm is not None:
            from ..pp._stain import check_method

            self.stain_norm = check_method(self.stain_norm)
        elif self.stain_reference is not None:
            raise StdistillError("stain_reference is set but stain_norm is None; pass stain_norm='macenko' or 'reinhard'")
        if self.adapter not in ("miss", "lora", "none"):
            raise StdistillError(f"adapter must be 'miss', 'lora' or 'none', got {self.adapter!r}")
        if self.val_metric not in ("ridge", "head", "mse"):
            raise StdistillError(f"val_metric must be 'ridge', 'head' or 'mse', got {self.val_metric!r}")
        if not 1 <= self.views <= 8:
            raise StdistillError(f"views must be 1..8 (dihedral transforms), got {self.views}")
        if self.lr < 0:
            raise StdistillError(f"lr must be >= 0, got {self.lr}")

    @property
    def r(self) -> int:
        return self.rank if self.rank is not None else (128 if self.adapter == "miss" else 64)

    def record(self) -> dict:
        """The settings as a JSON-able dict (saved with a model, part of checkpoint fingerprints); the
        stain fields only when stain normalisation is on, so runs without it keep the saved files and
        fingerprints (resumable checkpoints) they had before the option existed."""
        d = asdict(self)
        if d["stain_norm"] is None:
            del d["stain_norm"], d["stain_reference"]
        return d

    @property
    def maximize(self) -> bool:
        """Whether a larger validation score is better (all but ``"mse"``)."""
        return self.val_metric != "mse"
