"""The operations model.py calls, with the implementation chosen per device.

On CUDA the Triton kernels of ``trt_gemma.kernels`` run; on CPU their plain-PyTorch references do.
To run the real kernels on CPU, under Triton's interpreter, set both ``TRITON_INTERPRET=1`` (before
anything imports triton) and ``TRT_GEMMA_TRITON_ON_CPU=1``. Two switches, because test suites set
``TRITON_INTERPRET`` process-wide for the kernel tests, and interpreting a whole model is far too
slow to happen by accident. The choice is made per call from the tensor's device, so one process
can hold CPU and CUDA models.

Numerics follow gemma_pytorch / transformers: RMSNorm in fp32 then ``(1 + w)``, GeGLU with the tanh
approximation, rope cos/sin computed in fp32 and rounded to the activation dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from trt_gemma.kernels import reference


def use_triton(x: torch.Tensor) -> bool:
    """Triton kernels for CUDA tensors; for CPU tensors only when interpreting is asked for."""
    if x.is_cuda:
        return True
    env = os.environ
    return env.get("TRT_GEMMA_TRITON_ON_CPU") == "1" and env.get("TRITON_INTERPRET") == "1"


@functools.cache
def _attention_kernels():
    from trt_gemma.kernels import attention

    return attention


# Linear layers -------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight.T for a dense weight, or the matching GEMM for a quantized weight object.

    Quantized weight formats (``Int4Weight``, ``Fp8Weight``) live beside their GEMMs in kernels/
    and carry their own ``linear`` dispatch, so this stays one line per format.
    """
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    return weight.linear(x)


# Norms and activations -----------------------------------------------------------------------


def norm_scale(weight: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm multiplies by ``(1 + weight)`` in fp32: that factor, made once per model."""
    return 1.0 + weight.float()


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm: normalise in fp32, multiply by ``scale = norm_scale(weight)`` (fp32, the
    last dim's size, or broadcastable to x, e.g. per head), round to x's dtype.

    One fused ``F.rms_norm`` instead of five elementwise ops: a decode step runs six norms per
    layer, and on CPU each op costs its dispatch more than its arithmetic. Same math, same bits.
    """
    dim = (x.shape[-1],)
    if scale.shape == dim:
        return F.rms_norm(x.float(), dim, scale, eps).to(x.dtype)
    return (F.rms_norm(x.float(), dim, None, eps) * scale).to(x.dtype)


def gelu_tanh_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU: gelu_tanh(gate) * up."""
    return F.gelu(gate, approximate="tanh") * up


# Rotary embeddings -------------------------------------------------------------------------


def rope_cos_sin(
    positions: torch.Tensor,  # [T] int
    head_dim: int,
    base: float,
    scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, 1, head_dim], [T, 1, head_dim]) in dtype
    """cos and *signed* sin of HF's rotate-half rope, shaped to broadcast over heads; linear
    scaling divides positions by ``scaling``.

    rotate_half(x) * sin == roll(x, half) * signed_sin, with signed_sin = (-sin_lo, sin_hi):
    a sign flip is exact, so ``apply_rope`` gives the reference's bits in four ops, not nine.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (base ** (exponent / head_dim)) / scaling
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, : head_dim // 2].neg_()
    return emb.cos().to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rope(
    x: torch.Tensor,  # [T, heads, head_dim]
    cos: torch.Tensor,  # [T, 1, head_dim]
    signed_sin: torch.Tensor,  # [T, 1, head_dim], from rope_cos_sin
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (HF's rotate-half convention)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# Attention -----------------------------------------------------------------------------------


def prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw) -> torch.Tensor:
    """Varlen attention; see kernels/reference.py for the exact contract."""
    if use_triton(q):
        return _attention_kernels().prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw)
    return reference.prefill_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, **kw) -> torch.Tensor:
    """One query per sequence against its paged KV cache."""
    if use_triton(q):
        return _attention_kernels().paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, **kw
        )
    return reference.paged_decode_attention_ref(
        q, k_cache, v_cache, block_tables, context_lens, **kw
    )


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, **kw) -> None:
    """Store new keys/values into their cache slots (in place)."""
    if use_triton(k):
        return _attention_kernels().write_kv_cache(k, v, k_cache, v_cache, slot_mapping, **kw)
    return reference.write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, **kw)


# Logits --------------------------------------------------------------------------------------


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap
