"""Argument checks shared by the kernel launchers: one clear error naming the argument.

Launchers validate shapes, dtypes and devices before a launch because a Triton kernel given a
wrong stride or dtype reads garbage rather than failing.
"""

from __future__ import annotations

import torch


def check_tensor(name: str, t, desc: str, shape: tuple, dtypes: tuple, device) -> None:
    """Raise ValueError naming `name` unless t is a tensor of `shape` (None = any size) and one of
    `dtypes` on `device` (None = any), with a contiguous last dimension (other strides are
    free)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor {desc}, got {type(t).__name__}")
    want = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
    if t.dim() != len(shape) or any(
        d is not None and d != n for d, n in zip(shape, t.shape, strict=True)
    ):
        raise ValueError(f"{name}: expected shape {desc} = {want}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1)")
