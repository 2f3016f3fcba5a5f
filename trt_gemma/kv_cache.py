"""A contiguous KV cache for one sequence: the simple attention backend.

The runtime's paged cache (runtime/) serves batches; this one serves single-sequence generation,
perplexity evaluation and tests, with one ``[max_len, num_kv_heads, head_dim]`` buffer per layer.
"""

from __future__ import annotations

import torch

from trt_gemma import ops
from trt_gemma.config import GemmaConfig
from trt_gemma.errors import RequestError
from trt_gemma.model import AttentionBackend


class ContiguousKVCache(AttentionBackend):
    """Call ``forward(model, ids)`` repeatedly; each call appends its tokens to the sequence."""

    def __init__(self, config: GemmaConfig, max_len: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        self.max_len = max_len
        shape = (config.num_hidden_layers, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # tokens stored so far
        self._new = 0  # tokens being added by the forward in progress

    def forward(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the model on the next tokens of the sequence; returns their final hidden states."""
        n = int(input_ids.shape[0])
        if self.length + n > self.max_len:
            raise RequestError(
                f"sequence of {self.length + n} tokens exceeds the cache's {self.max_len} tokens"
            )
        positions = torch.arange(self.length, self.length + n, device=input_ids.device)
        self._new = n
        hidden = model.forward(input_ids, positions, self)
        self.length += n
        return hidden

    def attend(self, layer, q, k, v, *, scale, sliding_window, softcap):
        start, end = self.length, self.length + self._new
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        # A window layer's queries never see keys older than end - n - W + 1: skip them. Relative
        # positions are unchanged because queries stay the last ones.
        first = 0 if sliding_window is None else max(0, end - self._new - sliding_window + 1)
        n_q, n_k = self._new, end - first
        dev = q.device
        return ops.prefill_attention(
            q, self.k[layer, first:end], self.v[layer, first:end],
            torch.tensor([0, n_q], dtype=torch.int32, device=dev),
            torch.tensor([0, n_k], dtype=torch.int32, device=dev),
            scale=scale, causal=True, sliding_window=sliding_window, softcap=softcap,
        )
