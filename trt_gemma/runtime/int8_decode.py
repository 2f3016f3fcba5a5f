"""Small CPU steps on INT8 copies of the decoder's linear weights (W8A16): half the bytes of bf16.

A decode step of a few sequences reads every weight once and does little arithmetic with it, so
on CPU its time is the bytes it reads. Per-output-channel INT8 weights with bf16 scales, through
PyTorch's int8 weight-only CPU kernel (``torch._weight_int8pack_mm``: bf16 activations, fp32
accumulation), halve those bytes. Measured on Gemma 3 270M (bf16, 2 cores): a batch-1 decode step
61 -> 50 ms on a loaded machine; perplexity +0.2% on both bundled texts (768 tokens each;
35.85 -> 35.92 held-out, 37.41 -> 37.49 calibration).

The kernel is a GEMV whose cost grows with the rows (all 18 layers of the 270M at 32 rows: 52 ms
vs 30 ms for the bf16 GEMMs), so only steps of at most ``EngineConfig.cpu_int8_decode_max_rows``
tokens use the twin; larger steps keep the model's own weights. Only for bf16/fp16 models: with
fp32 activations the kernel is several times slower than an fp32 GEMV, and fp32 runs are the
exact reference (batch invariance is asserted there).

The twin shares the embedding, norms and LM head with the model (the head has its own int8 path
for greedy rows, runtime/greedy_head.py); only dense linear weights get an INT8 copy. Built once
per model (~1 s for the 270M) and shared by every engine on it.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from trt_gemma import packed_linear
from trt_gemma.model import GemmaModel

_LINEARS = ("qkv", "o", "gate_up", "down")
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its INT8 twin


def available(model: GemmaModel) -> bool:
    return (model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16)
            and hasattr(torch, "_weight_int8pack_mm"))


@dataclasses.dataclass(frozen=True)
class Int8RowWeight:
    """W8A16: ``W ~ q * scale[:, None]``, q int8 [out, in] in -127..127, scale [out]."""

    q: torch.Tensor
    scale: torch.Tensor  # in the activation dtype, as the kernel takes it

    @classmethod
    def from_dense(cls, weight: torch.Tensor,
                   scale_dtype: torch.dtype | None = None) -> Int8RowWeight:
        """Per-row amax / 127, stored in ``scale_dtype`` (default: the weight's) rounded *up*,
        so no value needs more than +-127 and none is clipped."""
        w = weight.float()
        amax = w.abs().amax(dim=1).clamp(min=1e-30)
        scale = (amax / 127).to(scale_dtype or weight.dtype)
        low = scale.float() * 127 < amax
        scale[low] = torch.nextafter(scale[low], torch.full_like(scale[low], float("inf")))
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch._weight_int8pack_mm(rows, self.q, self.scale)
        return out.reshape(*x.shape[:-1], -1)


def _dense_linears(layer) -> dict[str, torch.Tensor]:
    """The layer's linear weights that are plain tensors (packed ones unpacked), by name."""
    weights = {name: packed_linear.dense(getattr(layer, name)) for name in _LINEARS}
    return {name: w for name, w in weights.items() if isinstance(w, torch.Tensor)}


def int8_twin(model: GemmaModel) -> GemmaModel:
    """The model with INT8 copies of its dense linear weights (cached per model)."""
    twin = _TWINS.get(model)
    if twin is None:
        layers = [
            dataclasses.replace(layer, **{
                name: Int8RowWeight.from_dense(w) for name, w in _dense_linears(layer).items()})
            for layer in model.layers
        ]
        twin = _TWINS[model] = GemmaModel(model.config, model.embed, layers, model.final_norm,
                                          model.lm_head, model.kv_scales)
    return twin
