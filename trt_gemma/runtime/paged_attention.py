"""The paged-KV attention backend the model calls for a scheduled batch.

The batch is packed: decode tokens first (one per sequence), then prefill chunks. Per layer,
``attend_projected`` takes q/k before their norm and rope and, on the Triton path, norms, ropes and
writes the new keys/values into their slots in one fused op (``ops.qk_norm_rope_kv_write``), then

- decodes read their sequence's blocks in place (``ops.paged_decode_attention``);
- prefill chunks attend over ``[first visible key, last query]`` of their sequence: the new keys
  themselves when no chunk has cached context (first chunks without prefix hits), else keys
  gathered from the cache by flat slot (earlier chunks, prefix-cache hits). Sliding layers gather
  only the keys inside the window of the chunk's first query.

All index tensors are built once per step (``AttentionMetadata``), not per layer.

FP8 cache (``KVCache.scales``): keys/values are stored as ``k / k_scale`` in e4m3 with per-layer
scales from the engine build, and every read (decodes and prefills alike) dequantizes them, so a
token's attention never depends on whether its keys came from this step or the cache.

CPU fast path (when ``ops`` would run the PyTorch references): the decodes of a step attend in one
batched matmul over their visible keys, gathered by flat slot and padded to the longest (masked),
instead of the reference's loop of small per-sequence ops; keys are stored with one
``index_copy_``. On a shared 2-core CPU, small ops are what costs: each waits for both OpenMP
threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trt_gemma import ops
from trt_gemma.model import AttentionBackend
from trt_gemma.kernels.reference import FP8_DTYPE


@dataclass
class GroupMetadata:
    """Per KV group: where this step's tokens go and which cached tokens each query reads."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, flat slot of each new token (-1: skip)
    block_tables: torch.Tensor  # [num_decodes, max_blocks] int32 (dropped blocks read as 0)
    context_lens: torch.Tensor  # [num_decodes] int32, keys each decode query sees
    prefill_key_slots: torch.Tensor | None  # [total_keys] int64; None: prefills use new k/v
    cu_seqlens_k: torch.Tensor | None  # [num_prefills + 1] int32 over prefill_key_slots
    # CPU fast path only: each decode's visible keys as flat slots, padded; mask False = padding
    decode_key_slots: torch.Tensor | None = None  # [num_decodes, max_visible] int64
    decode_key_mask: torch.Tensor | None = None  # [num_decodes, max_visible] bool


@dataclass
class AttentionMetadata:
    num_decodes: int  # leading tokens that are single-token decodes
    cu_seqlens_q: torch.Tensor  # [num_prefills + 1] int32 over the prefill tokens
    groups: list[GroupMetadata]  # one per KV group


class KVCache:
    """The cache tensors: per group ``[num_layers_in_group, num_blocks, block_size, kv_heads,
    head_dim]`` for keys and values, plus where each model layer lives in them."""

    def __init__(self, groups, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device,
                 scales: list[tuple[float, float]] | None = None):
        if (dtype == FP8_DTYPE) != (scales is not None):
            raise ValueError("KVCache: an FP8 cache needs per-layer (k_scale, v_scale), and only "
                             "an FP8 cache takes them")
        # FP8: per model layer, the cache stores k / k_scale and v / v_scale in e4m3. The scales
        # live on the device as [1] fp32 tensors, made once: kernels read them by pointer, and
        # no per-step host-to-device copy breaks a CUDA-graph capture. Kept as the attention
        # ops' keyword arguments, ready to pass.
        self.scales = None if scales is None else [
            {name: torch.tensor([s], dtype=torch.float32, device=device)
             for name, s in zip(("k_scale", "v_scale"), pair, strict=True)}
            for pair in scales]
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.layer_slot: dict[int, tuple[int, int]] = {}  # model layer -> (group, index)
        self._workspace, self._workspace_batch = None, 0  # see decode_workspace
        for g, group in enumerate(groups):
            shape = (len(group.layers), group.num_blocks, block_size, num_kv_heads, head_dim)
            # zeros, not empty: kernels multiply masked probabilities by cache contents
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
            for i, layer in enumerate(group.layers):
                self.layer_slot[layer] = (g, i)

    def decode_workspace(self, batch: int, num_heads: int) -> torch.Tensor:
        """Scratch for the Triton decode's split outputs, shared by every layer (launches run in
        stream order). Made for the largest batch seen so far, so it is allocated once in
        practice: CUDA-graph capture runs the largest size first, outside the capture."""
        if self._workspace_batch < batch:
            from trt_gemma.kernels.attention import decode_workspace

            k = self.k[0]
            self._workspace = decode_workspace(batch, num_heads, k.shape[-2], k.shape[-1],
                                               k.device)
            self._workspace_batch = batch
        return self._workspace

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy-on-write: block src -> dst in every layer of its group."""
        for g, src, dst in copies:
            self.k[g][:, dst] = self.k[g][:, src]
            self.v[g][:, dst] = self.v[g][:, src]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PagedAttention(AttentionBackend):
    """``model.AttentionBackend`` over a ``KVCache`` for one step's ``AttentionMetadata``."""

    def __init__(self, cache: KVCache, meta: AttentionMetadata):
        self.cache = cache
        self.meta = meta

    def attend_projected(self, layer, qk, v, *, num_q_heads, rope, qk_norm, eps, scale,
                         sliding_window, softcap):
        g, i = self.cache.layer_slot[layer]
        k_cache, v_cache = self.cache.k[g][i], self.cache.v[g][i]
        meta, gm = self.meta, self.meta.groups[g]
        fp8 = self.cache.scales is not None
        kv_scales = self.cache.scales[layer] if fp8 else {}
        fast = gm.decode_key_slots is not None and not fp8
        if fast:  # CPU: the references' norm and rope, then one index_copy_ per cache
            qk = ops.qk_norm_rope_kv_write(qk, v, rope, qk_norm, eps, num_q_heads)
            flat = (-1, *k_cache.shape[2:])
            k_cache.view(flat).index_copy_(0, gm.slot_mapping,
                                           qk[:, num_q_heads:].to(k_cache.dtype))
            v_cache.view(flat).index_copy_(0, gm.slot_mapping, v.to(v_cache.dtype))
        else:  # one fused launch on the Triton path: norm, rope, KV write
            qk = ops.qk_norm_rope_kv_write(qk, v, rope, qk_norm, eps, num_q_heads, k_cache,
                                           v_cache, gm.slot_mapping, **kv_scales)
        q, k = qk[:, :num_q_heads], qk[:, num_q_heads:]
        d, n = meta.num_decodes, q.shape[0]
        triton = ops.use_triton(q)
        # Triton, decodes and prefills in one step: both write into one output, no concatenation
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if triton and 0 < d < n else None
        parts = []
        if d and fast:
            parts.append(_decode_cpu(q[:d], k_cache, v_cache, gm.decode_key_slots,
                                     gm.decode_key_mask, scale, softcap))
        elif d:
            parts.append(ops.paged_decode_attention(
                q[:d], k_cache, v_cache, gm.block_tables, gm.context_lens,
                scale=scale, sliding_window=sliding_window, softcap=softcap,
                out=None if out is None else out[:d],
                workspace=self.cache.decode_workspace(d, q.shape[1]) if triton else None,
                **kv_scales,
            ))
        if n > d:
            if gm.prefill_key_slots is None:  # never with FP8: prefills read the rounded cache
                keys, values, cu_k = k[d:], v[d:], meta.cu_seqlens_q
            else:
                flat = (-1, *k_cache.shape[2:])
                keys = k_cache.view(flat).index_select(0, gm.prefill_key_slots)
                values = v_cache.view(flat).index_select(0, gm.prefill_key_slots)
                cu_k = gm.cu_seqlens_k
            parts.append(ops.prefill_attention(
                q[d:], keys, values, meta.cu_seqlens_q, cu_k,
                scale=scale, causal=True, sliding_window=sliding_window, softcap=softcap,
                out=None if out is None else out[d:],
                **(kv_scales if gm.prefill_key_slots is not None else {}),
            ))
        if out is not None:
            return out
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def cpu_decode_keys(
    block_tables: torch.Tensor,  # [num_decodes, max_blocks] int32, on CPU
    context_lens: torch.Tensor,  # [num_decodes] int32, on CPU
    block_size: int,
    sliding_window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # slots int64, mask bool: [num_decodes, max_visible]
    """Flat slots of the keys each decode query can see (its window only), padded with its first
    block's first slot. In numpy: the same few array ops cost several times less than torch's
    per-op dispatch, which is most of their time at these sizes."""
    tables = np.ascontiguousarray(block_tables.numpy()).astype(np.int64)
    lens = context_lens.numpy().astype(np.int64)
    d = lens.shape[0]
    if not d:
        return torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, 0, dtype=torch.bool)
    if sliding_window:
        start = np.maximum(lens - sliding_window, 0)
        pos = start[:, None] + np.arange(int((lens - start).max()))  # [D, width]
        mask = pos < lens[:, None]
        pos *= mask  # padding reads position 0
        block, offset = np.divmod(pos, block_size)
        block += (np.arange(d) * tables.shape[1])[:, None]  # a 1-D take beats take_along_axis
        slots = np.take(tables.ravel(), block)
        slots *= block_size
        slots += offset
    else:  # every row starts at 0: one column index for all rows
        pos = np.arange(int(lens.max()))
        mask = pos < lens[:, None]
        block, offset = np.divmod(pos, block_size)
        slots = np.take(tables, block, axis=1)  # C-contiguous, as the decode's view needs
        slots *= block_size
        slots += offset
        np.copyto(slots, tables[:, :1] * block_size, where=~mask)  # padding reads position 0
    return torch.from_numpy(slots), torch.from_numpy(mask)


def _decode_cpu(
    q: torch.Tensor,  # [D, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [D, L] int64
    mask: torch.Tensor,  # [D, L] bool
    scale: float,
    softcap: float | None,
) -> torch.Tensor:  # [D, num_heads, head_dim]
    """The reference's decode math (fp32 scores and softmax), batched over sequences."""
    d, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    flat = (-1, num_kv_heads, head_dim)
    shape = (*slots.shape, num_kv_heads, head_dim)
    # index_select copies whole rows; advanced indexing (cache[slots]) is ~5x slower here.
    keys = k_cache.view(flat).index_select(0, slots.view(-1)).view(shape).float()  # [D, L, Hkv, hd]
    values = v_cache.view(flat).index_select(0, slots.view(-1)).view(shape).float()
    qh = (q.float() * scale).view(d, num_kv_heads, num_heads // num_kv_heads, head_dim)
    s = torch.matmul(qh, keys.permute(0, 2, 3, 1))  # [D, Hkv, G, L]
    if softcap is not None:
        s = s.div_(softcap).tanh_().mul_(softcap)
    s.masked_fill_(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, values.permute(0, 2, 1, 3))  # [D, Hkv, G, hd]
    return o.reshape(d, num_heads, head_dim).to(q.dtype)
