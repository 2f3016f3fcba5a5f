"""Dense bf16 linear weights on CPU, reordered once into oneDNN's blocked layout.

``F.linear`` on a bf16 CPU tensor runs a oneDNN inner product that first reorders the weight into
the blocked layout its kernel reads, on every call. For a decode step that is the whole cost
twice over: the step reads each weight once, and the reorder reads and writes it again. Reordering
once at load and calling the inner product on the packed weight skips that. Measured on a 2-core
AVX-512 CPU, the 72 decoder linears of Gemma 3 270M: 1 row 17.7 -> 12.8 ms, 8 rows 19.7 ->
13.9 ms, 32 rows 33.6 -> 24.6 ms; 512 and 2048 rows unchanged.

It is the same oneDNN kernel on the same weight, so the bits are the same as ``F.linear``'s
(``available`` checks that on a probe before anything is packed). fp32 is left alone: there
``F.linear`` is MKL's sgemm and oneDNN's fp32 kernel sums in another order, which would break
the fp32 batch-invariance the runtime asserts against single-sequence runs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# The row count oneDNN tunes the packed layout for; measured as good from 1 to 2048 rows.
BATCH_HINT = 32


class PackedLinearWeight:
    """``[out, in]`` bf16 weight in oneDNN's layout; ``ops.linear`` calls ``linear``."""

    def __init__(self, weight: torch.Tensor):
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.device = weight.device
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.shape[0])
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [],
                                                  "")

    def dense(self) -> torch.Tensor:
        """The original ``[out, in]`` tensor (a plain copy; exact)."""
        return self.packed.to_dense()


@functools.cache
def available() -> bool:
    """oneDNN is there and its packed kernel gives ``F.linear``'s bits on this CPU."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
        packed = PackedLinearWeight(w)
        for rows in (1, 5, 33):
            x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
            if not torch.equal(packed.linear(x), F.linear(x, w)):
                return False
    except (RuntimeError, AttributeError):  # no mkldnn ops in this build, or no bf16 support
        return False
    return True


def pack(weight):
    """``weight`` packed when it is a dense bf16 CPU matrix and packing is available, else as is."""
    if (isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.device.type == "cpu" and available()):
        return PackedLinearWeight(weight)
    return weight


def dense(weight):
    """The plain tensor behind a packed weight; anything else as is."""
    return weight.dense() if isinstance(weight, PackedLinearWeight) else weight
