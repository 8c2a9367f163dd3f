"""peft adapters (MiSS block-affine or LoRA) on the tail of a registered encoder's backbone.

peft's MiSS wraps only ``nn.Linear`` (``MissLinear``; a ``Conv2d`` target raises), so each targeted
1x1 ``Conv2d`` of a CNN is first rewritten as an exactly equivalent channels-last ``nn.Linear``
(:class:`Pointwise`); LoRA gets the same targets so the two adapters are compared on equal terms.
"""

from __future__ import annotations

import torch
from torch import nn

from .._errors import StdistillError
from ._config import ADAPTER_KEYS, AdapterConfig
from ._cut import parse_cut, tail_blocks


class Pointwise(nn.Module):
    """A 1x1 ``Conv2d`` (stride 1, no groups) as a channels-last ``nn.Linear`` (same weights, same output).

    peft's MiSS adapts only ``nn.Linear``; this makes the pointwise convolutions of CNNs adaptable.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise StdistillError(f"Pointwise needs a 1x1, stride-1, ungrouped Conv2d, got {conv}")
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight[:, :, 0, 0])
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def adapter_targets(backbone: nn.Module, train_from: str | None = None) -> list[str]:
    """Module names adapted after the cut: ViT ``blocks.i.attn.qkv``; EfficientNet the 1x1
    convolutions (``conv_pw``, ``conv_pwl``, ``conv_head``), named as *before* :class:`Pointwise`."""
    cut = parse_cut(backbone, train_from)
    if cut.arch == "vit":
        return [f"{n}.attn.qkv" for n, _ in tail_blocks(backbone, cut)]
    names = []
    if cut.inner:
        names.append(f"blocks.{cut.stage}.{cut.block}.conv_pwl")
    for n, blk in tail_blocks(backbone, cut):
        for child in ("conv_pw", "conv_pwl"):
            m = getattr(blk, child, None)
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
                names.append(f"{n}.{child}")
    names.append("conv_head")
    return names


def is_adapter_key(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to a peft adapter."""
    return any(k in name for k in ADAPTER_KEYS)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _peft_config(cfg: AdapterConfig, targets: list[str]):
    import peft

    r = cfg.r
    if cfg.adapter == "miss":
        return peft.MissConfig(r=r, target_modules=targets, init_weights=cfg.miss_init, mini_r=cfg.mini_r)
    return peft.LoraConfig(r=r, lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else r,
                           target_modules=targets, lora_dropout=0.0, init_lora_weights=True)


def add_adapter(backbone: nn.Module, cfg: AdapterConfig) -> dict:
    """Insert ``cfg.adapter`` into ``backbone`` in place and freeze everything else.

    Returns ``{"adapter", "rank", "targets", "n_base", "n_trainable", "share"}`` (``share`` =
    adapter parameters / encoder parameters).
    """
    import peft

    for p in backbone.parameters():
        p.requires_grad_(False)
    n_base = sum(p.numel() for p in backbone.parameters())
    cut = parse_cut(backbone, cfg.train_from)
    targets = adapter_targets(backbone, cfg.train_from)
    if cfg.adapter == "none":
        return {"adapter": "none", "targets": [], "n_base": n_base, "n_trainable": 0, "share": 0.0}
    peft_targets = targets
    if cut.arch == "effnet":
        for t in targets:
            m = backbone.get_submodule(t)
            if isinstance(m, nn.Conv2d):
                _set_module(backbone, t, Pointwise(m).to(m.weight.device))
        peft_targets = [f"{t}.linear" for t in targets]
    try:
        peft.inject_adapter_in_model(_peft_config(cfg, peft_targets), backbone)
    except (ValueError, TypeError) as e:
        raise StdistillError(f"peft could not add a {cfg.adapter} adapter with r={cfg.r}: {e}") from None
    n_train = 0
    for n, p in backbone.named_parameters():
        p.requires_grad_(is_adapter_key(n))
        n_train += p.numel() if is_adapter_key(n) else 0
    return {"adapter": cfg.adapter, "rank": cfg.r, "targets": targets, "n_base": n_base, "n_trainable": n_train,
            "share": n_train / n_base}
