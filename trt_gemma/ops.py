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


@functools.cache
def _fused_kernels():
    """The fused decode-step kernels (norms, GeGLU, q/k norm + rope + KV write) in one place."""
    from types import SimpleNamespace

    from trt_gemma.kernels import activation, norm, rope_kv

    return SimpleNamespace(rms_norm=norm.rms_norm, add_rms_norm=norm.add_rms_norm,
                           gelu_tanh_and_mul=activation.gelu_tanh_and_mul,
                           qk_norm_rope_kv_write=rope_kv.qk_norm_rope_kv_write)


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

    Triton: one launch (2-D x, one scale per column). CPU: one fused ``F.rms_norm`` instead of five
    elementwise ops (on CPU each op costs its dispatch more than its arithmetic); same bits.
    """
    if use_triton(x) and x.dim() == 2 and scale.dim() == 1:
        return _fused_kernels().rms_norm(x, scale, eps)
    return reference.rms_norm_ref(x, scale, eps)


def add_rms_norm(
    h: torch.Tensor,  # [T, D] a sublayer's output
    residual: torch.Tensor,  # [T, D]
    scale: torch.Tensor | None,  # [D] fp32 norm of the new residual; None: no norm
    eps: float,
    *,
    pre_scale: torch.Tensor | None = None,  # [D] fp32 norm of h first (Gemma 2/3 post-norms)
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (residual + post_norm(h), its norm or None)
    """The glue between sublayers in one launch on the Triton path. ``in_place``: the new residual
    may overwrite ``residual`` (the model's forward owns its residual stream; the quantizer, which
    differentiates through the CPU path, does not pass it)."""
    if use_triton(h):
        return _fused_kernels().add_rms_norm(h, residual, scale, eps, pre_scale=pre_scale,
                                             residual_out=residual if in_place else None)
    return reference.add_rms_norm_ref(h, residual, scale, eps, pre_scale=pre_scale)


def gelu_tanh_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU: gelu_tanh(gate) * up (the two may be halves of the fused gate_up output)."""
    if use_triton(gate):
        return _fused_kernels().gelu_tanh_and_mul(gate, up)
    return reference.gelu_tanh_and_mul_ref(gate, up)


# Rotary embeddings -------------------------------------------------------------------------


class RotaryPositions:
    """One step's rope for one (base, scaling): the tokens' positions and the inverse frequencies.

    The Triton path computes cos/sin inside the fused q/k kernel from these two; the CPU path asks
    ``cos_sin()``, computed once per step and shared by every layer with this rope.
    """

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        self.positions = positions  # [T] int
        self.inv_freq = inv_freq  # [head_dim // 2] fp32 (reference.rope_inv_freq)
        self.dtype = dtype
        self._cos_sin = None

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, 1, hd], [T, 1, hd]) in dtype
        if self._cos_sin is None:
            self._cos_sin = reference.rope_cos_sin_ref(self.positions, self.inv_freq, self.dtype)
        return self._cos_sin


def qk_norm_rope_kv_write(
    qk: torch.Tensor,  # [T, H + Hkv, hd] query heads then key heads, before norm and rope
    v: torch.Tensor,  # [T, Hkv, hd]
    rope: RotaryPositions,
    norm: torch.Tensor | None,  # [H + Hkv, hd] fp32 per-head (1 + w), or None (Gemma 1/2)
    eps: float,
    num_q_heads: int,
    k_cache: torch.Tensor | None = None,  # [num_blocks, block_size, Hkv, hd]; None: no write
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,  # [T] flat slots, -1 = skip
    **kv_scales,  # k_scale / v_scale of an FP8 cache
) -> torch.Tensor:  # [T, H + Hkv, hd] normed and roped (in place on the Triton path)
    """q/k RMSNorm + rope (+ the keys/values stored in their cache slots): one launch on the
    Triton path; on CPU the reference's ops with the step's shared cos/sin."""
    if use_triton(qk):
        return _fused_kernels().qk_norm_rope_kv_write(
            qk, v, rope.positions, rope.inv_freq, norm, eps, num_q_heads, k_cache, v_cache,
            slot_mapping, **kv_scales)
    return reference.qk_norm_rope_kv_write_ref(
        qk, v, rope.positions, rope.inv_freq, norm, eps, num_q_heads, k_cache, v_cache,
        slot_mapping, cos_sin=rope.cos_sin(), **kv_scales)


# Attention -----------------------------------------------------------------------------------


def prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, out=None, **kw) -> torch.Tensor:
    """Varlen attention; see kernels/reference.py for the exact contract. ``out``: where the
    result goes (the Triton launcher writes it in place)."""
    if use_triton(q):
        return _attention_kernels().prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                      out=out, **kw)
    return _into(out, reference.prefill_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, out=None,
                           workspace=None, **kw) -> torch.Tensor:
    """One query per sequence against its paged KV cache. ``workspace``: the Triton decode's
    scratch for split outputs (``kernels.attention.decode_workspace``), made once by the caller."""
    if use_triton(q):
        return _attention_kernels().paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, out=out, workspace=workspace, **kw
        )
    return _into(out, reference.paged_decode_attention_ref(
        q, k_cache, v_cache, block_tables, context_lens, **kw
    ))


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    return result if out is None else out.copy_(result)


# Logits --------------------------------------------------------------------------------------


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap
