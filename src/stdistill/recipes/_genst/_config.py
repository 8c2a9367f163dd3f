"""GenST's settings (:class:`GenstConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..._errors import StdistillError

__all__ = ["GenstConfig"]


@dataclass
class GenstConfig:
    """Settings of one GenST run.

    ``codebook_size``/``hist_codebook_size``: codes of the expression / histology ``VectorQuantize``
    (``quantizer="fsq"``: ``FSQ`` with ``prod(fsq_levels)`` codes for both). ``expr_epochs``: stage 1;
    ``max_epochs``: stage 2 (alignment; chosen by :func:`select_genst`). ``head_input``:
    ``"quantized"`` (the head reads the histology code's vector: at most ``hist_codebook_size``
    distinct predictions) or ``"continuous"`` (the encoder's latent before quantisation).
    ``temperature``/``top_k``: how expression codes are drawn for the spread and :meth:`GenST.sample`.

    ``histology``: what the histology VQ-VAE reads. ``"features"``: cached patch features of an
    encoder (an MLP VQ-VAE, ``hist_hidden``); ``"pixels"``: the patch pixels themselves, end to end
    (a convolutional VQ-VAE: ``patch_um`` micrometres resampled to ``patch_px`` pixels, one stride-2
    convolution per ``conv_channels`` entry, so ``patch_px`` must be divisible by
    ``2 ** len(conv_channels)``). ``hist_epochs``: epochs of histology reconstruction alone before
    the alignment; ``augment`` (pixels): random 90-degree rotations, flips and per-channel intensity
    jitter of the training patches.
    """

    codebook_size: int = 64
    hist_codebook_size: int = 64
    quantizer: str = "vq"
    fsq_levels: tuple[int, ...] = (8, 5, 5)
    latent_dim: int = 32
    hidden: tuple[int, ...] = (128,)
    hist_hidden: tuple[int, ...] = (256,)
    head_hidden: tuple[int, ...] = (128,)
    proj_dim: int = 32
    likelihood: str = "nb"
    commitment_weight: float = 0.25
    expr_epochs: int = 80
    max_epochs: int = 30
    patience: int = 8
    maximize: bool = True
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    dropout: float = 0.1
    w_rec: float = 1.0
    w_ce: float = 1.0
    w_con: float = 0.5
    con_temperature: float = 0.1
    head_input: str = "quantized"
    feature_clip: float = 10.0
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    histology: str = "features"
    patch_um: float = 112.0
    patch_px: int = 64
    conv_channels: tuple[int, ...] = (16, 32, 64, 64)
    hist_epochs: int = 0
    augment: bool = True

    def __post_init__(self):
        self.fsq_levels, self.hidden = tuple(self.fsq_levels), tuple(self.hidden)
        self.hist_hidden, self.head_hidden = tuple(self.hist_hidden), tuple(self.head_hidden)
        self.conv_channels = tuple(self.conv_channels)
        choices = {"quantizer": ("vq", "fsq"), "likelihood": ("nb", "mse"), "head_input": ("quantized", "continuous"),
                   "histology": ("features", "pixels")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise StdistillError(f"{k} must be one of {allowed}, got {getattr(self, k)!r}")
        for k in ("codebook_size", "hist_codebook_size", "latent_dim", "batch_size", "expr_epochs"):
            if getattr(self, k) < 1:
                raise StdistillError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("w_rec", "w_ce", "w_con", "max_epochs", "hist_epochs"):
            if getattr(self, k) < 0:
                raise StdistillError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.temperature <= 0 or self.con_temperature <= 0:
            raise StdistillError("temperature and con_temperature must be > 0")
        if self.top_k is not None and self.top_k < 1:
            raise StdistillError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.histology == "pixels":
            stride = 2 ** len(self.conv_channels)
            if not self.conv_channels or self.patch_px % stride or self.patch_um <= 0:
                raise StdistillError(f"histology='pixels' needs conv_channels, patch_um > 0 and patch_px divisible by "
                                     f"{stride} (2 ** len(conv_channels)), got patch_px={self.patch_px}")
