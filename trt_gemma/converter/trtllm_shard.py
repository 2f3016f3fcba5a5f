"""Tensor-parallel ranks of a TensorRT-LLM checkpoint: which slice of every tensor rank r holds.

``rank_tensors`` returns one ``rank{r}.safetensors`` dict per rank (tp = 1: the whole model). The
rules, as read in NVIDIA/TensorRT-LLM (main, 2025) and TensorRT-Model-Optimizer:

- ``attention.qkv`` is column-parallel with ``is_qkv`` (layers/attention.py ``Attention``: out
  = tp * (heads / tp) * d + 2 * tp * ceil(kv_heads / tp) * d): rank r holds [q_r; k_r; v_r], the
  r-th block of query heads and of KV heads. With fewer KV heads than ranks each rank holds one
  KV head, head ``r // (tp / kv_heads)`` (ModelOpt export/layer_utils.py ``dup_kv_weight``:
  ``repeat_interleave`` of the heads by tp / kv_heads, then an even split; the
  models/convert_utils.py ``dup_kv_weight`` is the same rule). Attention asserts
  ``heads % tp == 0``; dup_kv_weight asserts ``tp % kv_heads == 0``.
- ``mlp.fc`` and ``mlp.gate`` are column-parallel (GatedMLP: ffn / tp outputs per rank),
  ``attention.dense`` and ``mlp.proj`` row-parallel (RowLinear: in / tp inputs per rank).
- Scales follow ModelOpt's split table (export/postprocess.py ``_split_model_config_for_tp``):
  FP8 per-tensor scales are replicated; INT4 column linears split ``weights_scaling_factor``
  with the outputs and replicate ``prequant_scaling_factor``; INT4 row linears split both with
  the inputs. ``zero`` [in / group, out] is cut like the scales it scales.
- Embedding: models/gemma/config.py ``GemmaConfig`` forces ``use_parallel_embedding = tp > 1``
  (whatever the checkpoint says) with ``embedding_sharding_dim`` 0 (PretrainedConfig's default):
  layers/embedding.py ``Embedding`` holds ceil(vocab / tp) rows per rank. ``lm_head`` is a
  ColumnLinear of ``pad_vocab_size(vocab, tp)`` outputs (models/gemma/model.py); padded rows are
  zero (ModelOpt ``pad_weights``).
- Norms, q/k norms (one [head_dim] weight shared by all heads) and ``kv_cache_scaling_factor``
  are replicated.
- W4A16 linears are padded by TensorRT-LLM when their global in or out features are not a
  multiple of max(64, group) * tp (quantization/layers.py ``WeightOnlyGroupwiseQuantLinear``),
  which would no longer match our tensors: refused instead.
"""

from __future__ import annotations

from typing import Any

import torch

from trt_gemma.config import GemmaConfig, QuantConfig, check_tensor_parallel_split
from trt_gemma.converter.trtllm_weights import Part, linear_parts, norm_weight
from trt_gemma.errors import ConfigError

# role -> axis of the part's OUT / IN features in TensorRT-LLM's checkpoint layout
_OUT_AXIS = {"weight": 0, "weights_scaling_factor": 0, "zero": 1}
_IN_AXIS = {"weight": 1, "weights_scaling_factor": 1, "zero": 0, "prequant_scaling_factor": 0}


def padded_vocab(vocab_size: int, tp: int) -> int:
    """TensorRT-LLM's ``_utils.pad_vocab_size``: the next multiple of tp."""
    return -(-vocab_size // tp) * tp


def kv_heads_per_rank(config: GemmaConfig, tp: int) -> int:
    return -(-config.num_key_value_heads // tp)  # Attention.num_attention_kv_heads


def check_tensor_parallel(config: GemmaConfig, quant: QuantConfig, tp: int) -> None:
    """ConfigError when TensorRT-LLM cannot split this model over ``tp`` ranks as exported."""
    check_tensor_parallel_split(config, tp, "--tp-size")
    if quant.mode not in ("int4", "int4-awq"):
        return
    multiple = max(64, quant.group_size) * tp
    qkv_out = config.q_size + 2 * tp * kv_heads_per_rank(config, tp) * config.head_dim
    h, i = config.hidden_size, config.intermediate_size
    for name, (out, inp) in {"attention.qkv": (qkv_out, h), "attention.dense": (h, config.q_size),
                             "mlp.fc": (i, h), "mlp.gate": (i, h), "mlp.proj": (h, i)}.items():
        if out % multiple or inp % multiple:
            raise ConfigError(f"TensorRT-LLM export: {name} is [{out}, {inp}]; W4A16 at tp {tp} "
                              f"needs multiples of {multiple} (TensorRT-LLM would pad it)")


def _narrow(t: torch.Tensor, axis: int, start: int, stop: int, total: int) -> torch.Tensor:
    """Features [start, stop) of ``total`` along ``axis`` (which may hold total / k entries)."""
    n = t.shape[axis]
    if (start * n) % total or (stop * n) % total:
        raise ConfigError(f"TensorRT-LLM export: cannot cut {n} entries at feature {start}")
    a, b = start * n // total, stop * n // total
    return t.narrow(axis, a, b - a)


def _replicated(role: str, parts: list[Part]) -> torch.Tensor:
    first = parts[0][role]
    if any(not torch.equal(p[role], first) for p in parts[1:]):
        raise ConfigError(f"TensorRT-LLM export: fused parts disagree on their {role}")
    return first


def column_cut(parts: list[Part], cuts: list[tuple[int, int]], sizes: list[int]) -> Part:
    """One rank of a column-parallel linear: part i cut to out features ``cuts[i]`` of
    ``sizes[i]``, the cuts concatenated; roles without an out axis are shared."""
    out: Part = {}
    for role in parts[0]:
        axis = _OUT_AXIS.get(role) if parts[0][role].numel() > 1 else None
        if axis is None:  # per-tensor FP8 scales, the shared AWQ prequant scale
            out[role] = _replicated(role, parts)
            continue
        out[role] = torch.cat([_narrow(p[role], axis, a, b, n)
                               for p, (a, b), n in zip(parts, cuts, sizes)], dim=axis)
    return out


def row_cut(part: Part, start: int, stop: int, size: int) -> Part:
    """One rank of a row-parallel linear: input features [start, stop) of ``size``."""
    out: Part = {}
    for role, t in part.items():
        axis = _IN_AXIS.get(role) if t.numel() > 1 else None
        out[role] = t if axis is None else _narrow(t, axis, start, stop, size)
    return out


def _even(size: int, tp: int, r: int) -> tuple[int, int]:
    return r * size // tp, (r + 1) * size // tp


def kv_cut(config: GemmaConfig, tp: int, r: int) -> tuple[int, int]:
    """Output features of k (or v) that rank r holds: its block of KV heads, or one replicated
    head ``r // (tp / kv_heads)`` when there are fewer KV heads than ranks."""
    kv, d = config.num_key_value_heads, config.head_dim
    if kv >= tp:
        return _even(kv * d, tp, r)
    head = r // (tp // kv)
    return head * d, (head + 1) * d


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _layer(config: GemmaConfig, w: dict[str, Any], dtype: torch.dtype, tp: int,
           n: int) -> list[dict[str, torch.Tensor]]:
    """Layer n's tensors of every rank (popped from ``w``)."""
    src, dst = f"layers.{n}.", f"transformer.layers.{n}."
    i, q = config.intermediate_size, config.q_size
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def parts(theirs: str, ours: list[str]) -> list[Part]:
        return linear_parts(dst + theirs, [w.pop(f"{src}{x}.weight") for x in ours], dtype)

    def put(prefix: str, rank_part: list[Part]) -> None:
        for r, part in enumerate(rank_part):
            ranks[r].update({f"{dst}{prefix}.{role}": t for role, t in part.items()})

    qkv = parts("attention.qkv", [f"self_attn.{x}_proj" for x in "qkv"])
    sizes = [q, config.kv_size, config.kv_size]
    put("attention.qkv", [column_cut(qkv, [_even(q, tp, r), kv_cut(config, tp, r),
                                           kv_cut(config, tp, r)], sizes) for r in range(tp)])
    (dense,) = parts("attention.dense", ["self_attn.o_proj"])
    put("attention.dense", [row_cut(dense, *_even(q, tp, r), q) for r in range(tp)])
    # fc is the activated branch (gate_proj), gate the linear one (up_proj)
    for theirs, ours in (("mlp.fc", "mlp.gate_proj"), ("mlp.gate", "mlp.up_proj")):
        branch = parts(theirs, [ours])
        put(theirs, [column_cut(branch, [_even(i, tp, r)], [i]) for r in range(tp)])
    (proj,) = parts("mlp.proj", ["mlp.down_proj"])
    put("mlp.proj", [row_cut(proj, *_even(i, tp, r), i) for r in range(tp)])

    norms = {"input_layernorm": "input_layernorm"}
    if config.use_post_norms:
        norms.update(post_attention_layernorm="post_layernorm",
                     pre_feedforward_layernorm="pre_feedforward_layernorm",
                     post_feedforward_layernorm="post_feedforward_layernorm")
    else:  # Gemma 1: the norm before the MLP is TensorRT-LLM's post_layernorm
        norms.update(pre_feedforward_layernorm="post_layernorm")
    if config.use_qk_norm:
        norms.update({"self_attn.q_norm": "attention.q_layernorm",
                      "self_attn.k_norm": "attention.k_layernorm"})
    shared = {f"{dst}{theirs}.weight": norm_weight(w.pop(f"{src}{ours}.weight"), dtype)
              for ours, theirs in norms.items()}
    k_scale = w.pop(src + "self_attn.k_scale", None)
    v_scale = w.pop(src + "self_attn.v_scale", None)
    if k_scale is not None:  # TensorRT-LLM keeps one KV-cache scale per layer
        shared[dst + "attention.kv_cache_scaling_factor"] = torch.maximum(
            k_scale.float(), v_scale.float()).reshape(1)
    for rank in ranks:
        rank.update(shared)
    return ranks


def rank_tensors(config: GemmaConfig, weights: dict[str, Any], dtype: torch.dtype,
                 tp: int = 1) -> list[dict[str, torch.Tensor]]:
    """Our engine tensors (canonical names, quantized objects) -> one TensorRT-LLM tensor dict
    per tensor-parallel rank (call ``check_tensor_parallel`` first)."""
    w = dict(weights)
    vocab = padded_vocab(config.vocab_size, tp)
    rows = vocab // tp
    embed = w.pop("embed_tokens.weight").to(dtype)
    head = w.pop("lm_head.weight", None)
    if head is not None and not isinstance(head, torch.Tensor):
        raise ConfigError("TensorRT-LLM export: a quantized lm_head is not supported")
    # TensorRT-LLM's Gemma converter always writes lm_head (a copy when tied: safetensors cannot
    # store two names for one buffer; save_checkpoint clones repeated tensors the same way).
    embed_padded = _pad_rows(embed, vocab)
    head_padded = _pad_rows(embed if head is None else head.to(dtype), vocab)
    ranks = [{"transformer.vocab_embedding.weight": embed_padded[r * rows:(r + 1) * rows]}
             for r in range(tp)]
    for n in range(config.num_hidden_layers):
        for rank, layer in zip(ranks, _layer(config, w, dtype, tp, n)):
            rank.update(layer)
    ln_f = norm_weight(w.pop("norm.weight"), dtype)
    for r, rank in enumerate(ranks):
        rank["transformer.ln_f.weight"] = ln_f
        rank["lm_head.weight"] = head_padded[r * rows:(r + 1) * rows]
    if w:
        raise ConfigError(f"TensorRT-LLM export: unexpected tensors {sorted(w)[:3]}")
    return ranks
