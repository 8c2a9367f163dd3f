"""Precision of feature extraction: names, the "auto" choice per device, the autocast context."""

from __future__ import annotations

import contextlib
from typing import Any

from .._errors import StdistillError

_PRECISIONS = {
    "fp32": "fp32", "32": "fp32", "32-true": "fp32", "float32": "fp32",
    "bf16": "bf16", "bf16-mixed": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "16": "fp16", "16-mixed": "fp16", "float16": "fp16",
}


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast is faster.

    Measured here (2-core AMD EPYC with AVX512-BF16, tf_efficientnet_lite0, batch 64, channels
    last): bf16 about 1.3-2x the patches/s of fp32; ``benchmarks/extract_throughput.py`` prints
    both. Without native bf16 the emulation is slower than fp32.
    """
    import torch

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover
            pass
    return False


def resolve_precision(precision: str, device: str) -> str:
    """``"auto"`` -> ``"bf16"`` on a GPU that supports it (else ``"fp16"``), ``"fp32"`` on a CPU.

    On a CPU "auto" is always fp32, so features (and every number computed from them) are the
    same on every processor: bf16 moves HEST scores by about 10% and is only faster on CPUs with
    native bf16 (:func:`cpu_has_native_bf16`); pass ``"bf16"`` explicitly for that speed. Other
    values: ``"fp32"``, ``"bf16"``, ``"fp16"`` (aliases like ``"bf16-mixed"`` are accepted).
    """
    import torch

    if precision == "auto":
        if str(device).startswith("cuda"):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    try:
        return _PRECISIONS[str(precision).lower()]
    except KeyError:
        raise StdistillError(f"unknown precision {precision!r}; use 'auto', 'fp32', 'bf16' or 'fp16'") from None


def autocast(device: Any, precision: str):
    """The autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    dev_type = torch.device(device).type
    return torch.autocast(device_type=dev_type, dtype=dtype)
