"""Weight quantization: pure tensor math, no I/O.

The formats (``Int4Weight``, ``Fp8Weight``) are defined beside their GEMMs in ``trt_gemma.kernels``
so the runtime never imports this package; it only produces them.
"""

from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight, pack_int4, unpack_int4
from trt_gemma.quant.awq import (
    awq_output_error,
    awq_search_scales,
    fold_into_gemma_norm,
    quantize_int4_awq,
)
from trt_gemma.quant.fp8 import fp8_activation_scale, kv_cache_scale, quantize_fp8
from trt_gemma.quant.int4 import fake_quantize_int4, quantize_int4_codes, quantize_int4_rtn

__all__ = [
    "Fp8Weight",
    "Int4Weight",
    "awq_output_error",
    "awq_search_scales",
    "fake_quantize_int4",
    "fold_into_gemma_norm",
    "fp8_activation_scale",
    "kv_cache_scale",
    "pack_int4",
    "quantize_fp8",
    "quantize_int4_awq",
    "quantize_int4_codes",
    "quantize_int4_rtn",
    "unpack_int4",
]
