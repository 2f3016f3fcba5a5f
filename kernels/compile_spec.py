"""What a kernel module tells the ahead-of-time compile check about the launches it can make.

Every kernel module (attention, fused norms/rope, GEMMs) exposes

    def compile_specs(cc: tuple[int, int]) -> list[KernelSpec]

listing every configuration its launchers can choose on a GPU of compute capability ``cc``
(each dtype, head_dim 128 and 256, each feature flag the runtime sets). Launchers and
``compile_specs`` pick tiles through the same helper functions, so what is checked is what runs.
``kernels/aot.py`` compiles each spec for sm80/sm89/sm90 with Triton's compiler and the wheel's
ptxas (no GPU needed) and reports registers, shared memory and spills.

No Triton import here: a spec only names the already-built ``@triton.jit`` function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    name: str  # e.g. "decode_split[bf16,hd256,fp8kv]": unique per module, readable in a table
    fn: Any  # the @triton.jit function
    # every non-constexpr argument, in order, with its Triton type: "*bf16", "*fp16", "*fp32",
    # "*fp8e4nv", "*i32", "*i64", "*u8", "i32", "i64", "fp32"
    args: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)  # every constexpr argument's value
    num_warps: int = 4
    num_stages: int = 1
