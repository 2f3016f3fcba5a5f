"""The Gemma forward pass, written once for Gemma 1, 2 and 3.

Generations differ only in config fields: QK-norm (Gemma 3), post-attention/post-feedforward norms
(Gemma 2/3), attention and final logit soft-caps (Gemma 2), sliding-window layers with their own
rope base (Gemma 2/3), linear rope scaling of global layers (Gemma 3 4B+).

The model never allocates or owns a KV cache: each call receives an ``AttentionBackend`` that stores
the new keys/values wherever its cache lives (a contiguous buffer, the runtime's paged blocks) and
attends. Tokens of a batch are packed: ``input_ids`` and ``positions`` are ``[num_tokens]``, and the
backend knows which tokens belong to which sequence.

Weights are plain tensors or quantized weight objects (see kernels/gemm_*.py), applied through
``ops.linear``; the model is not an nn.Module because nothing here trains.

Tensor parallelism (``distributed/``): built with a ``TensorParallel`` context of size N, the model
holds one rank's shard (``distributed/shard.py``) and ``config`` is that rank's config (its share of
the heads and MLP width). The only differences in the math are four collectives: an all-reduce
after the row-parallel o and down projections, one after the vocab-parallel embedding lookup, and
an all-gather of the vocab-parallel logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from trt_gemma import ops, packed_linear
from trt_gemma.config import GemmaConfig
from trt_gemma.distributed.group import SINGLE_RANK, TensorParallel
from trt_gemma.kernels import reference
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight


class AttentionBackend:
    """Where keys/values go and how queries attend to them: the model calls ``attend_projected``.

    A simple backend implements ``attend`` (q and k already normed and roped); the default
    ``attend_projected`` norms and ropes them first. The runtime's paged backend overrides
    ``attend_projected`` to do q/k norm, rope and its KV-cache write in one fused op.
    """

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rope applied
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rope applied
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store k/v for the batch's new tokens, then attend each query to its sequence's keys."""
        raise NotImplementedError

    def attend_projected(
        self,
        layer: int,
        qk: torch.Tensor,  # [num_tokens, num_heads + num_kv_heads, head_dim], before norm/rope
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        *,
        num_q_heads: int,
        rope: ops.RotaryPositions,
        qk_norm: torch.Tensor | None,  # [num_heads + num_kv_heads, head_dim] fp32 (1 + w)
        eps: float,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        qk = ops.qk_norm_rope_kv_write(qk, v, rope, qk_norm, eps, num_q_heads)
        return self.attend(layer, qk[:, :num_q_heads], qk[:, num_q_heads:], v, scale=scale,
                           sliding_window=sliding_window, softcap=softcap)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Any  # fused [q+k+v, hidden] dense (or packed_linear) weight, or a tuple (q, k, v)
    o: Any
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_attn_norm: torch.Tensor | None
    pre_ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor | None
    gate_up: Any  # fused [2*intermediate, hidden] dense tensor, or a tuple (gate, up)
    down: Any


def _fuse(parts: list[Any]) -> Any:
    """Concatenate weights that read the same input along the output dim: one GEMM instead of
    several. Quantized weights fuse when their formats line up (the converter quantizes q/k/v and
    gate/up as groups sharing one AWQ scale and one activation scale); else a tuple, one GEMM
    each."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=0)
    fused = _fuse_quantized(parts)
    return tuple(parts) if fused is None else fused


def _same(tensors: list[torch.Tensor | None]) -> bool:
    first = tensors[0]
    if first is None:
        return all(t is None for t in tensors)
    return all(t is not None and t.dtype == first.dtype and torch.equal(t, first)
               for t in tensors)


def _fuse_quantized(parts: list[Any]) -> Any:
    """Row-concatenated Int4Weight / per-channel Fp8Weight, or None when they cannot be."""
    first = parts[0]
    if all(isinstance(p, Int4Weight) for p in parts):
        if (len({p.group_size for p in parts}) > 1 or len({p.scales.dtype for p in parts}) > 1
                or not _same([p.pre_quant_scale for p in parts])
                or len({p.zeros is None for p in parts}) > 1):
            return None
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
        return dataclasses.replace(first, qweight=torch.cat([p.qweight for p in parts]),
                                   scales=torch.cat([p.scales for p in parts]), zeros=zeros)
    if all(isinstance(p, Fp8Weight) for p in parts):
        if not _same([p.input_scale for p in parts]):
            return None
        # per-tensor scales become per-channel ones (the same products)
        scales = [p.weight_scale.expand(p.out_features) for p in parts]
        return dataclasses.replace(first, weight=torch.cat([p.weight for p in parts]),
                                   weight_scale=torch.cat(scales))
    return None


def _split_linear(x: torch.Tensor, weight: Any, sizes: list[int]) -> list[torch.Tensor]:
    if isinstance(weight, tuple):
        return [ops.linear(x, w) for w in weight]
    return list(ops.linear(x, weight).split(sizes, dim=-1))


@dataclass
class NormScales:
    """One layer's RMSNorm factors ``(1 + w)`` in fp32 (``ops.norm_scale``), made once per model
    rather than on every call."""

    input: torch.Tensor
    post_attn: torch.Tensor | None
    pre_ff: torch.Tensor
    post_ff: torch.Tensor | None
    qk: torch.Tensor | None  # [heads + kv_heads, head_dim]: q_norm per query head, then k_norm

    @classmethod
    def of(cls, w: LayerWeights, config: GemmaConfig) -> NormScales:
        def scale(t):
            return None if t is None else ops.norm_scale(t)

        qk = None
        if w.q_norm is not None:  # q and k are normed (and roped) as one [T, H + Hkv, hd] tensor
            qk = torch.cat([scale(w.q_norm).expand(config.num_attention_heads, -1),
                            scale(w.k_norm).expand(config.num_key_value_heads, -1)])
        return cls(scale(w.input_norm), scale(w.post_attn_norm), scale(w.pre_ff_norm),
                   scale(w.post_ff_norm), qk)


def decoder_layer(cfg: GemmaConfig, i: int, w: LayerWeights, ns: NormScales, x: torch.Tensor,
                  rope: ops.RotaryPositions, attention: AttentionBackend) -> torch.Tensor:
    """One decoder layer on packed tokens ``x`` [num_tokens, hidden] (rope of layer ``i``).

    A plain function of tensors, not under ``inference_mode``: the quantizer's block-wise scale
    refinement (``quant/refine.py``) differentiates through it, so the math it fits is exactly the
    math the runtime runs (``GemmaModel.forward`` runs the same ``_layer``, carrying the next
    layer's input norm along instead of starting from ``x``).
    """
    residual, _ = _layer(cfg, i, w, ns, x, ops.rms_norm(x, ns.input, cfg.rms_norm_eps), rope,
                         attention, next_norm=None, in_place=False)
    return residual


def _layer(cfg: GemmaConfig, i: int, w: LayerWeights, ns: NormScales, residual: torch.Tensor,
           h: torch.Tensor, rope: ops.RotaryPositions, attention: AttentionBackend,
           next_norm: torch.Tensor | None, in_place: bool,
           tp: TensorParallel = SINGLE_RANK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer ``i`` from its residual stream and that stream's input-normed copy ``h``; returns the
    new residual stream and its norm by ``next_norm`` (the next layer's input norm, or the final
    norm), so each residual add and the norm after it are one fused op."""
    eps = cfg.rms_norm_eps
    h = _self_attention(cfg, i, w, ns, h, rope, attention, tp)
    residual, h = ops.add_rms_norm(h, residual, ns.pre_ff, eps, pre_scale=ns.post_attn,
                                   in_place=in_place)
    gate, up = _split_linear(h, w.gate_up, [cfg.intermediate_size] * 2)
    h = tp.all_reduce(ops.linear(ops.gelu_tanh_and_mul(gate, up), w.down))  # row-parallel
    return ops.add_rms_norm(h, residual, next_norm, eps, pre_scale=ns.post_ff, in_place=in_place)


def _self_attention(cfg: GemmaConfig, i: int, w: LayerWeights, ns: NormScales, h: torch.Tensor,
                    rope: ops.RotaryPositions, attention: AttentionBackend,
                    tp: TensorParallel = SINGLE_RANK) -> torch.Tensor:
    n, hd = h.shape[0], cfg.head_dim
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    if isinstance(w.qkv, tuple):
        q, k, v = (ops.linear(h, part) for part in w.qkv)
        qk = torch.cat([q.view(n, heads, hd), k.view(n, kv_heads, hd)], dim=1)
    else:  # q and k side by side in the fused output: one view, no copy
        qkv = ops.linear(h, w.qkv)
        qk = qkv[:, :cfg.q_size + cfg.kv_size].view(n, heads + kv_heads, hd)
        v = qkv[:, cfg.q_size + cfg.kv_size:]
    o = attention.attend_projected(
        i, qk, v.view(n, kv_heads, hd),
        num_q_heads=heads, rope=rope, qk_norm=ns.qk, eps=cfg.rms_norm_eps,
        scale=cfg.attention_scale,
        sliding_window=cfg.layer_window(i),
        softcap=cfg.attn_logit_softcapping,
    )
    return tp.all_reduce(ops.linear(o.reshape(n, cfg.q_size), w.o))  # row-parallel


GREEDY_CHUNK = 32768  # vocabulary rows per chunk of GemmaModel.greedy_tokens on CPU


class GemmaModel:
    """Gemma decoder. Build with ``from_state_dict``; call ``forward`` then ``compute_logits``."""

    def __init__(self, config: GemmaConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: Any,
                 kv_scales: list[tuple[float, float]] | None = None,
                 tp: TensorParallel = SINGLE_RANK):
        self.config = config
        self.tp = tp
        # vocab-parallel: this rank holds embedding / LM-head rows [vocab_start, + rows)
        self.vocab_start = tp.rank * embed.shape[0]
        # FP8 KV cache: per layer (k_scale, v_scale), the cache stores k / k_scale in e4m3. Set
        # when the engine was built with --kv-cache-dtype fp8; the runtime decides whether to use
        # it.
        self.kv_scales = kv_scales
        self.embed = embed  # [vocab, hidden]
        self.layers = layers
        self.final_norm = final_norm
        self.norm_scales = [NormScales.of(w, config) for w in layers]
        self.final_norm_scale = ops.norm_scale(final_norm)
        self.lm_head = lm_head  # the embedding itself when tied
        self.dtype = embed.dtype
        self.device = embed.device
        # sqrt(hidden) rounded to the activation dtype first, as the reference implementations do.
        self.normalizer = torch.tensor(config.hidden_size**0.5, dtype=self.dtype)
        # Rope inverse frequencies per (base, scaling), made once: every step's cos/sin follow
        # from them and the positions (inside the fused q/k kernel on the Triton path).
        self.inv_freq = {key: reference.rope_inv_freq(config.head_dim, *key, self.device)
                         for key in {config.layer_rope(i)
                                     for i in range(config.num_hidden_layers)}}

    @classmethod
    def from_state_dict(cls, config: GemmaConfig, weights: dict[str, Any],
                        dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        pack_cpu_linears: bool = True,
                        tp: TensorParallel = SINGLE_RANK) -> GemmaModel:
        """Take canonical tensors (see checkpoint/base.py); dense ones move to dtype/device.
        With tensor parallelism: one rank's shards, with ``config`` that rank's config.

        On CPU, dense bf16 linears are reordered once into oneDNN's layout (``packed_linear``:
        same bits, faster small GEMMs) unless ``pack_cpu_linears`` is False.
        """
        pack = packed_linear.pack if pack_cpu_linears else (lambda w: w)

        def get(name: str) -> Any:
            w = weights.pop(name)
            if isinstance(w, torch.Tensor):
                return w.to(device=device, dtype=dtype)
            return w.to(device)  # quantized weight objects keep their own storage dtypes

        def maybe(name: str) -> Any:
            return get(name) if name in weights else None

        weights = dict(weights)
        layers = []
        for i in range(config.num_hidden_layers):
            p = f"layers.{i}."
            layers.append(LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                qkv=pack(_fuse([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])),
                o=pack(get(p + "self_attn.o_proj.weight")),
                q_norm=maybe(p + "self_attn.q_norm.weight"),
                k_norm=maybe(p + "self_attn.k_norm.weight"),
                post_attn_norm=maybe(p + "post_attention_layernorm.weight"),
                pre_ff_norm=get(p + "pre_feedforward_layernorm.weight"),
                post_ff_norm=maybe(p + "post_feedforward_layernorm.weight"),
                gate_up=pack(_fuse([get(p + "mlp.gate_proj.weight"),
                                    get(p + "mlp.up_proj.weight")])),
                down=pack(get(p + "mlp.down_proj.weight")),
            ))
        embed = get("embed_tokens.weight")
        lm_head = embed if config.tie_word_embeddings else get("lm_head.weight")
        kv_scales = None
        if "layers.0.self_attn.k_scale" in weights:
            kv_scales = [(float(weights.pop(f"layers.{i}.self_attn.k_scale")),
                          float(weights.pop(f"layers.{i}.self_attn.v_scale")))
                         for i in range(config.num_hidden_layers)]
        return cls(config, embed, layers, get("norm.weight"), lm_head, kv_scales, tp)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int
        positions: torch.Tensor,  # [num_tokens] int, absolute position of each token
        attention: AttentionBackend,
    ) -> torch.Tensor:  # [num_tokens, hidden] final-normed hidden states
        cfg = self.config
        x = self._embed(input_ids) * self.normalizer
        ropes = {key: ops.RotaryPositions(positions, inv_freq, x.dtype)
                 for key, inv_freq in self.inv_freq.items()}
        # The residual stream x and its normed copy h travel together: each layer ends with one
        # fused add + norm by the next layer's input norm (the last one by the final norm).
        h = ops.rms_norm(x, self.norm_scales[0].input, cfg.rms_norm_eps)
        last = len(self.layers) - 1
        for i, (w, ns) in enumerate(zip(self.layers, self.norm_scales, strict=True)):
            next_norm = self.final_norm_scale if i == last else self.norm_scales[i + 1].input
            x, h = _layer(cfg, i, w, ns, x, h, ropes[cfg.layer_rope(i)], attention, next_norm,
                          in_place=True, tp=self.tp)
        return h

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.embed[input_ids]
        # vocab-parallel: each rank looks up the ids it holds, zeros elsewhere; the sum is exact
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed.shape[0])
        x = self.embed[local.clamp(0, self.embed.shape[0] - 1)] * mine.unsqueeze(-1)
        return self.tp.all_reduce(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 logits, final soft-cap applied (Gemma 2)."""
        logits = ops.linear(hidden, self.lm_head).float()
        if self.tp.size > 1:  # vocab-parallel: every rank's rows, less the vocabulary padding
            logits = self.tp.all_gather(logits)[:, :self.config.vocab_size]
        return ops.softcap(logits, self.config.final_logit_softcapping)

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        """The argmax of each row's logits (lowest id on ties, as ``torch.argmax``).

        Computed in the model's dtype (widening to fp32 is exact, so the argmax is the same) and
        without the final soft-cap (monotonic). On CPU the vocabulary is walked in chunks of
        ``GREEDY_CHUNK`` rows, keeping a running max: the [rows, vocab] logits are never written
        out (measured on 2 cores, 32 rows of the 262k x 640 head: 59 -> 49 ms).
        """
        head = self.lm_head
        if self.tp.size > 1:
            return self._vocab_parallel_argmax(hidden)
        if not isinstance(head, torch.Tensor) or hidden.device.type != "cpu":
            return ops.linear(hidden, head).argmax(dim=-1).tolist()
        best_value = best_index = None
        for start in range(0, head.shape[0], GREEDY_CHUNK):
            value, index = ops.linear(hidden, head[start:start + GREEDY_CHUNK]).max(dim=-1)
            if best_value is None:
                best_value, best_index = value, index
            else:
                better = value > best_value  # ties keep the earlier chunk: the lowest id
                best_value = torch.where(better, value, best_value)
                best_index = torch.where(better, index + start, best_index)
        return best_index.tolist()

    def _vocab_parallel_argmax(self, hidden: torch.Tensor) -> list[int]:
        """Each rank's best id among its vocabulary rows, then the best of those: two numbers
        per row cross ranks instead of the whole vocabulary (ties: the lowest id, as above)."""
        logits = ops.linear(hidden, self.lm_head).float()
        padding = self.vocab_start + logits.shape[-1] - self.config.vocab_size
        if padding > 0:  # zero rows padding the vocabulary: never the answer
            logits[:, logits.shape[-1] - min(padding, logits.shape[-1]):] = float("-inf")
        value, index = logits.max(dim=-1, keepdim=True)
        values = self.tp.all_gather(value)  # [rows, ranks]
        indices = self.tp.all_gather(index + self.vocab_start)
        best_rank = values.argmax(dim=-1, keepdim=True)  # first maximum: the lowest ids
        return indices.gather(-1, best_rank).squeeze(-1).tolist()
