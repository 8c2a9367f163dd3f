"""Where an encoder is split into a frozen trunk and a trainable tail ("the cut").

Cuts are named like the backbone's modules: ``"input"`` (train everything), ViT ``"blocks.K"``
(blocks K.. are the tail), EfficientNet ``"blocks.S"``, ``"blocks.S.B"`` or
``"blocks.S.B.conv_pwl"`` (inside block (S, B), after its depthwise convolution, allowed only in a
block without a skip connection). Architectures: timm ``VisionTransformer`` and
EfficientNet/MobileNet-style CNNs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .._errors import StdistillError


def arch(backbone: nn.Module) -> str:
    """``"vit"`` or ``"effnet"``; a clear error for other backbones."""
    if hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks"):
        return "vit"
    if hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks") and hasattr(backbone, "conv_head"):
        return "effnet"
    raise StdistillError(
        f"adapters know timm VisionTransformer and EfficientNet/MobileNet-style backbones, not {type(backbone).__name__}; "
        "register a timm ViT or EfficientNet encoder"
    )


def default_train_from(backbone: nn.Module) -> str:
    """The default cut: effnet: inside the last block, before its projection (``blocks.S.B.conv_pwl``)
    when that block has no skip connection, else the last stage; ViT: the last third of the blocks."""
    if arch(backbone) == "vit":
        n = len(backbone.blocks)
        return f"blocks.{n - max(1, n // 3)}"
    s = len(backbone.blocks) - 1
    b = len(backbone.blocks[s]) - 1
    blk = backbone.blocks[s][b]
    if hasattr(blk, "conv_pwl") and not getattr(blk, "has_skip", True):
        return f"blocks.{s}.{b}.conv_pwl"
    return f"blocks.{s}"


@dataclass(frozen=True)
class Cut:
    """A parsed cut. ``stage``: effnet stage / ViT block index; ``inner``: effnet, before ``conv_pwl``."""

    arch: str
    stage: int = 0
    block: int = 0
    inner: bool = False
    input: bool = False


def _bad_cut(tf: str, a: str) -> StdistillError:
    return StdistillError(
        f"train_from={tf!r} is not a cut of this {a}: use 'input', 'blocks.K' (ViT), or 'blocks.S', 'blocks.S.B', "
        "'blocks.S.B.conv_pwl' (EfficientNet)"
    )


def _parse_effnet(backbone: nn.Module, tf: str, parts: list[str]) -> Cut:
    s = int(parts[1])
    b = int(parts[2]) if len(parts) >= 3 else 0
    inner = len(parts) == 4 and parts[3] == "conv_pwl"
    if len(parts) > 4 or (len(parts) == 4 and not inner) or not 0 <= s < len(backbone.blocks) or not 0 <= b < len(backbone.blocks[s]):
        raise ValueError
    if inner:
        blk = backbone.blocks[s][b]
        if not hasattr(blk, "conv_pwl") or getattr(blk, "has_skip", True):
            raise StdistillError(f"train_from={tf!r}: can cut before conv_pwl only in a block without a skip connection")
    return Cut("effnet", stage=s, block=b, inner=inner)


def parse_cut(backbone: nn.Module, train_from: str | None) -> Cut:
    """Parse ``train_from`` (``None``: :func:`default_train_from`) against ``backbone``."""
    a = arch(backbone)
    tf = train_from or default_train_from(backbone)
    if tf == "input":
        return Cut(a, input=True)
    parts = tf.split(".")
    try:
        if parts[0] != "blocks":
            raise ValueError
        if a == "effnet":
            return _parse_effnet(backbone, tf, parts)
        if len(parts) != 2 or not 0 <= int(parts[1]) < len(backbone.blocks):
            raise ValueError
        return Cut(a, stage=int(parts[1]))
    except (ValueError, IndexError):
        raise _bad_cut(tf, a) from None


def tail_blocks(backbone: nn.Module, cut: Cut) -> list[tuple[str, nn.Module]]:
    """(name, module) of the whole blocks run after the cut (names relative to the backbone)."""
    if cut.arch == "vit":
        start = 0 if cut.input else cut.stage
        return [(f"blocks.{i}", backbone.blocks[i]) for i in range(start, len(backbone.blocks))]
    out = []
    for s in range(len(backbone.blocks)):
        for b in range(len(backbone.blocks[s])):
            if cut.input or (s, b) > (cut.stage, cut.block) or ((s, b) == (cut.stage, cut.block) and not cut.inner):
                out.append((f"blocks.{s}.{b}", backbone.blocks[s][b]))
    return out
