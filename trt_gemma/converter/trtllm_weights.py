"""Our engine tensors -> TensorRT-LLM checkpoint tensors, one linear *part* at a time.

A TensorRT-LLM linear may fuse several of ours (``attention.qkv`` = q, k, v). Each part is
converted on its own into the tensors TensorRT-LLM's checkpoint stores for it, in its layout
(below), so that ``trtllm_shard`` can cut every part by heads or channels for a tensor-parallel
rank and concatenate the cuts. Layouts, as read in NVIDIA/TensorRT-LLM and ModelOpt:

- dense: ``weight`` [out, in] at the model dtype.
- FP8 (tensorrt_llm/quantization/layers.py ``FP8Linear``): ``weight`` e4m3 [out, in],
  ``weights_scaling_factor`` and ``activation_scaling_factor`` fp32 [1] (per tensor). The parts
  of one fused linear share one weight scale (the largest channel scale of all of them), since
  TensorRT-LLM keeps one per linear.
- W4A16_AWQ (``WeightOnlyGroupwiseQuantLinear``; models/modeling_utils.py
  ``preprocess_perlayer_weights`` transposes ``weight`` and ``weights_scaling_factor`` itself):
  ``weight`` int8 [out / 2, in] of signed codes packed along OUT (ModelOpt
  model_config_utils.py ``to_quantized_weight``: row 2j low nibble, row 2j + 1 high nibble),
  ``weights_scaling_factor`` [out, in / group], ``prequant_scaling_factor`` [in] (shared by
  the fused parts), and with zero points ``zero`` [in / group, out] (not transposed by the
  loader: quantization/functional.py ``postprocess_weight_only_groupwise``).
"""

from __future__ import annotations

from typing import Any

import torch

from trt_gemma.errors import ConfigError
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import SYMMETRIC_ZERO, Int4Weight, unpack_int4
from trt_gemma.kernels.reference import quantize_fp8 as cast_to_fp8

Part = dict[str, torch.Tensor]  # role ("weight", "zero", ...) -> tensor, in the layout above


def pack_int4_rows(weight: Int4Weight) -> torch.Tensor:
    """Our Int4Weight codes ``q`` (0..15) -> TensorRT-LLM/ModelOpt int8 ``[out / 2, in]`` of
    ``q - 8`` (the zero point, if any, goes to ``zero_term``)."""
    if weight.out_features % 2:
        raise ConfigError(f"TensorRT-LLM export: INT4 out_features {weight.out_features} is odd")
    signed = unpack_int4(weight.qweight).to(torch.int16) - SYMMETRIC_ZERO  # [out, in] in -8..7
    low, high = signed[0::2] & 0xF, (signed[1::2] & 0xF) << 4
    return (low | high).to(torch.uint8).view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4_rows``: int8 ``[out / 2, in]`` -> signed codes int8 ``[out, in]``."""
    u = packed.view(torch.uint8).to(torch.int16)
    low, high = u & 0xF, u >> 4
    signed = torch.stack((low, high), dim=1).flatten(0, 1)  # rows 2j, 2j + 1
    return torch.where(signed > 7, signed - 16, signed).to(torch.int8)


def zero_term(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """TensorRT-LLM's additive ``zero`` ``[out, G]``: ``(8 - zero_point) * scale``.

    Its kernel computes ``w = (q - 8) * scale + zero`` (quantization/functional.py,
    ``postprocess_weight_only_groupwise``: ``zeros_x_scales = (8 - qzeros) * scales`` for AWQ-style
    zero points), which equals our ``(q - zero_point) * scale``.
    """
    zp = weight.zeros.float() if weight.zeros is not None else torch.full_like(
        weight.scales.float(), SYMMETRIC_ZERO)
    return ((SYMMETRIC_ZERO - zp) * weight.scales.float()).to(dtype)


def _int4_parts(prefix: str, parts: list[Int4Weight], dtype: torch.dtype) -> list[Part]:
    pqs = parts[0].pre_quant_scale
    if any((p.pre_quant_scale is None) != (pqs is None) or
           (pqs is not None and not torch.equal(p.pre_quant_scale, pqs)) for p in parts):
        raise ConfigError(f"TensorRT-LLM export: {prefix}: fused weights must share one AWQ scale")
    if pqs is None:  # RTN INT4 written as AWQ with a unit scale (see trtllm.py)
        pqs = torch.ones(parts[0].in_features)
    with_zero = any(p.zeros is not None for p in parts)
    out = []
    for p in parts:
        part = {"weight": pack_int4_rows(p), "weights_scaling_factor": p.scales.to(dtype),
                "prequant_scaling_factor": pqs.to(dtype)}
        if with_zero:
            part["zero"] = zero_term(p, dtype).T.contiguous()  # [in / group, out]
        out.append(part)
    return out


def _fp8_parts(prefix: str, parts: list[Fp8Weight]) -> list[Part]:
    """Per-channel FP8 parts -> per-tensor FP8 parts sharing the largest channel scale."""
    scale = torch.cat([p.weight_scale.float().flatten() for p in parts]).max()
    xs = parts[0].input_scale
    if xs is None:
        raise ConfigError(f"TensorRT-LLM export: {prefix} has no static activation scale "
                          "(TensorRT-LLM's FP8 needs one)")
    return [{"weight": cast_to_fp8(p.dequantize(torch.float32), scale),
             "weights_scaling_factor": scale.reshape(1).float(),
             "activation_scaling_factor": xs.reshape(1).float()} for p in parts]


def linear_parts(prefix: str, parts: list[Any], dtype: torch.dtype) -> list[Part]:
    """The TensorRT-LLM tensors of each of ``parts`` (our weights fused into ``prefix``)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return [{"weight": p.to(dtype)} for p in parts]
    if all(isinstance(p, Int4Weight) for p in parts):
        return _int4_parts(prefix, parts, dtype)
    if all(isinstance(p, Fp8Weight) for p in parts):
        return _fp8_parts(prefix, parts)
    raise ConfigError(f"TensorRT-LLM export: {prefix} mixes weight formats")


def norm_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w.float() + 1.0).to(dtype)  # TensorRT-LLM's RmsNorm multiplies by w, Gemma by 1 + w
