"""TensorRT-LLM backend: export a TensorRT-LLM checkpoint, then run (or print) ``trtllm-build``.

The checkpoint is the one ``trtllm-build --checkpoint_dir`` reads: ``config.json`` plus
``rank0.safetensors`` (one GPU: tp = pp = 1). It is converted from the very tensors the native
engine would store, so both backends run the same quantized weights. Format followed, as read in
NVIDIA/TensorRT-LLM (main, 2025; Gemma 3 support arrived in v0.19/v0.20):

- docs/source/architecture/checkpoint.md: config fields, ``mapping``, ``quantization`` block,
  tensor and scale names (``weights_scaling_factor``, ``activation_scaling_factor``,
  ``prequant_scaling_factor``, ``attention.kv_cache_scaling_factor``).
- tensorrt_llm/models/gemma/config.py: architectures ``GemmaForCausalLM``, ``Gemma2ForCausalLM``,
  ``Gemma3ForCausalLM``; Gemma 2 fields ``query_pre_attn_scalar``, ``final_logit_softcapping``,
  ``attn_logit_softcapping``; Gemma 3 fields ``query_pre_attn_scalar``,
  ``final_logit_softcapping``, ``_sliding_window_pattern``, ``rope_local_base_freq``,
  ``sliding_window`` (modeling_utils.py ``Gemma2ConfigGroup``/``Gemma3ConfigGroup``).
- tensorrt_llm/models/gemma/convert.py (``HfParser.rename_to_trt_llm``, ``load_gemma_weights``):
  q/k/v fused into ``attention.qkv``, o_proj -> ``attention.dense``, gate_proj -> ``mlp.fc`` (the
  activated branch), up_proj -> ``mlp.gate``, down_proj -> ``mlp.proj``; Gemma 1's pre-MLP norm and
  Gemma 2/3's post-attention norm -> ``post_layernorm``; q/k norms -> ``attention.q_layernorm`` /
  ``k_layernorm``; every RMSNorm weight stored as ``1 + w`` (TensorRT-LLM's RmsNorm multiplies by
  w); ``lm_head.weight`` written as a copy of the embedding.
- tensorrt_llm/models/gemma/model.py: ``hidden_act`` feeds ``GatedMLP``; TensorRT-LLM's ``gelu``
  (functional.py) is the tanh approximation Gemma uses.
- tensorrt_llm/quantization/layers.py ``FP8Linear``: fp8 ``weight`` [out, in], fp32
  ``weights_scaling_factor`` and ``activation_scaling_factor`` of shape [1] (per tensor).
  ``WeightOnlyGroupwiseQuantLinear``: ``weights_scaling_factor`` [in / group, out] and
  ``prequant_scaling_factor`` [1, in] after preprocessing; models/modeling_utils.py
  ``preprocess_perlayer_weights`` takes a W4A16_AWQ checkpoint's int8 ``weight`` [out / 2, in] and
  ``weights_scaling_factor`` [out, in / group] and transposes them itself.
- TensorRT-Model-Optimizer modelopt/torch/export/model_config_utils.py ``to_quantized_weight``:
  INT4 codes are signed (-8..7) and packed along the OUTPUT dim, row 2j in the low nibble and row
  2j + 1 in the high nibble of byte [j, k].

Mode mapping: ``fp8`` -> ``FP8`` (per-tensor weight scale: our per-channel scales are re-quantized
to the tensor's largest one; q/k/v share one scale because TensorRT-LLM fuses them); ``int4-awq``
-> ``W4A16_AWQ``; ``int4`` -> ``W4A16_AWQ`` with a unit ``prequant_scaling_factor``: TensorRT-LLM's
own ``W4A16`` is per-channel INT4 quantized by trtllm-build from dense weights, which would
discard our group-wise grid. Our INT4 has zero points, written as ``has_zero_point: true`` and a
``zero`` tensor [in / group, out] (``WeightOnlyGroupwiseQuantLinear(zero=True)``); ModelOpt's own
int4_awq export is symmetric, so this combination is the less travelled path of TensorRT-LLM.
FP8 KV cache -> ``kv_cache_quant_algo: FP8`` with one ``kv_cache_scaling_factor`` per layer,
``max(k_scale, v_scale)`` (TensorRT-LLM keeps one).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trt_gemma.config import FULL, GemmaConfig, QuantConfig
from trt_gemma.errors import CheckpointError, ConfigError
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import SYMMETRIC_ZERO, Int4Weight, unpack_int4
from trt_gemma.kernels.reference import quantize_fp8 as cast_to_fp8
from trt_gemma.trtllm_layout import (CHECKPOINT_DIR, ENGINE_DIR, EXPORT_JSON, TOKENIZER_DIR,
                                     runtime_settings)

ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM"}
QUANT_ALGOS = {"none": None, "fp8": "FP8", "int4-awq": "W4A16_AWQ", "int4": "W4A16_AWQ"}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_MULTIPLE = 64  # WeightOnlyGroupwiseQuantLinear pads in/out to max(64, group); we refuse instead


# config.json ---------------------------------------------------------------------------------


def _sliding_pattern(config: GemmaConfig) -> int:
    """Gemma 3's period P: TensorRT-LLM makes layer i global iff (i + 1) % P == 0."""
    n = config.num_hidden_layers
    for p in range(1, n + 2):
        if all((config.layer_types[i] == FULL) == ((i + 1) % p == 0) for i in range(n)):
            return p
    raise ConfigError("TensorRT-LLM export: Gemma 3 layer types do not follow one period of "
                      "local layers then a global one; TensorRT-LLM cannot express them")


def trtllm_config(config: GemmaConfig, quant: QuantConfig, dtype: torch.dtype,
                  has_zero_point: bool = False) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (``has_zero_point``: INT4 with zero points)."""
    arch = ARCHITECTURES[config.architecture]
    scaling = None
    if config.rope_scaling_factor != 1.0:
        scaling = {"type": "linear", "factor": config.rope_scaling_factor}
    algo = QUANT_ALGOS[quant.mode]
    d: dict[str, Any] = {
        "architecture": arch,
        "dtype": DTYPE_NAMES[dtype],
        "logits_dtype": "float32",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_size": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": "gelu",  # TensorRT-LLM's gelu is the tanh approximation
        "norm_epsilon": config.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": config.rope_theta,
        "rotary_scaling": scaling,
        "attn_bias": False,
        "mlp_bias": False,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {
            "quant_algo": algo,
            "kv_cache_quant_algo": "FP8" if quant.kv_cache_dtype == "fp8" else None,
            "group_size": quant.group_size,
            "has_zero_point": has_zero_point and algo == "W4A16_AWQ",
            "pre_quant_scale": algo == "W4A16_AWQ",
            "exclude_modules": None,  # TensorRT-LLM's default: lm_head, embeddings unquantized
        },
    }
    scalar = config.query_pre_attn_scalar or config.head_dim
    if config.architecture == "gemma2":
        d.update(query_pre_attn_scalar=scalar,
                 final_logit_softcapping=config.final_logit_softcapping,
                 attn_logit_softcapping=config.attn_logit_softcapping)
    elif config.architecture == "gemma3":
        d.update(query_pre_attn_scalar=scalar,
                 final_logit_softcapping=config.final_logit_softcapping,
                 _sliding_window_pattern=_sliding_pattern(config),
                 rope_local_base_freq=config.rope_local_base_freq,
                 sliding_window=config.sliding_window)
    return d


# rank0.safetensors ---------------------------------------------------------------------------


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


def _int4_group(prefix: str, parts: list[Int4Weight],
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    for w in parts:
        multiple = max(_MULTIPLE, w.group_size)
        if w.in_features % multiple or w.out_features % multiple:
            raise ConfigError(f"TensorRT-LLM export: {prefix} is [{w.out_features}, "
                              f"{w.in_features}]; W4A16 needs multiples of {multiple}")
    pqs = parts[0].pre_quant_scale
    if any((p.pre_quant_scale is None) != (pqs is None) or
           (pqs is not None and not torch.equal(p.pre_quant_scale, pqs)) for p in parts):
        raise ConfigError(f"TensorRT-LLM export: {prefix}: fused weights must share one AWQ scale")
    if pqs is None:
        pqs = torch.ones(parts[0].in_features)
    out = {
        f"{prefix}.weight": torch.cat([pack_int4_rows(p) for p in parts], dim=0),
        f"{prefix}.weights_scaling_factor": torch.cat([p.scales for p in parts]).to(dtype),
        f"{prefix}.prequant_scaling_factor": pqs.to(dtype),
    }
    if any(p.zeros is not None for p in parts):
        # [in / group, out]: preprocess_perlayer_weights transposes the scales but not `zero`.
        out[f"{prefix}.zero"] = torch.cat([zero_term(p, dtype) for p in parts]).T.contiguous()
    return out


def _fp8_group(prefix: str, parts: list[Fp8Weight]) -> dict[str, torch.Tensor]:
    """Per-channel FP8 parts -> one per-tensor FP8 weight (scale: the largest channel scale)."""
    dense = torch.cat([p.dequantize(torch.float32) for p in parts], dim=0)
    scale = torch.cat([p.weight_scale.float().flatten() for p in parts]).max()
    xs = parts[0].input_scale
    if xs is None:
        raise ConfigError(f"TensorRT-LLM export: {prefix} has no static activation scale "
                          "(TensorRT-LLM's FP8 needs one)")
    return {
        f"{prefix}.weight": cast_to_fp8(dense, scale),
        f"{prefix}.weights_scaling_factor": scale.reshape(1).float(),
        f"{prefix}.activation_scaling_factor": xs.reshape(1).float(),
    }


def _linear(prefix: str, parts: list[Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if all(isinstance(p, torch.Tensor) for p in parts):
        return {f"{prefix}.weight": torch.cat(parts, dim=0).to(dtype)}
    if all(isinstance(p, Int4Weight) for p in parts):
        return _int4_group(prefix, parts, dtype)
    if all(isinstance(p, Fp8Weight) for p in parts):
        return _fp8_group(prefix, parts)
    raise ConfigError(f"TensorRT-LLM export: {prefix} mixes weight formats")


def _norm(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w.float() + 1.0).to(dtype)  # TensorRT-LLM's RmsNorm multiplies by w, Gemma by 1 + w


def trtllm_tensors(config: GemmaConfig, weights: dict[str, Any],
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our engine tensors (canonical names, quantized objects) -> TensorRT-LLM's rank-0 tensors."""
    w = dict(weights)
    embed = w.pop("embed_tokens.weight").to(dtype)
    out = {"transformer.vocab_embedding.weight": embed}
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"transformer.layers.{i}."
        linears = {"attention.qkv": [f"self_attn.{n}_proj" for n in "qkv"],
                   "attention.dense": ["self_attn.o_proj"], "mlp.fc": ["mlp.gate_proj"],
                   "mlp.gate": ["mlp.up_proj"], "mlp.proj": ["mlp.down_proj"]}
        for theirs, ours in linears.items():
            parts = [w.pop(f"{src}{n}.weight") for n in ours]
            out.update(_linear(dst + theirs, parts, dtype))
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
        for ours, theirs in norms.items():
            out[f"{dst}{theirs}.weight"] = _norm(w.pop(f"{src}{ours}.weight"), dtype)
        k_scale = w.pop(src + "self_attn.k_scale", None)
        v_scale = w.pop(src + "self_attn.v_scale", None)
        if k_scale is not None:
            kv = torch.maximum(k_scale.float(), v_scale.float()).reshape(1)
            out[dst + "attention.kv_cache_scaling_factor"] = kv
    out["transformer.ln_f.weight"] = _norm(w.pop("norm.weight"), dtype)
    head = w.pop("lm_head.weight", None)
    if head is not None and not isinstance(head, torch.Tensor):
        raise ConfigError("TensorRT-LLM export: a quantized lm_head is not supported")
    # TensorRT-LLM's Gemma converter always writes lm_head (a copy when tied: safetensors cannot
    # store two names for one buffer).
    out["lm_head.weight"] = (embed.clone() if head is None else head.to(dtype))
    if w:
        raise ConfigError(f"TensorRT-LLM export: unexpected tensors {sorted(w)[:3]}")
    return out


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with its own storage (safetensors refuses shared buffers, and
    gate/up share one AWQ scale)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen or t.untyped_storage().nbytes() != t.nbytes else t
        seen.add(ptr)
    return out


# trtllm-build --------------------------------------------------------------------------------


def build_command(checkpoint_dir: Path, output_dir: Path, limits=None) -> list[str]:
    """The ``trtllm-build`` command line for a checkpoint and a resolved build profile."""
    cmd = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir",
           str(output_dir), "--gemm_plugin", "auto"]
    if limits is not None:
        cmd += ["--max_batch_size", str(limits.max_batch_size),
                "--max_input_len", str(limits.max_input_len),
                "--max_seq_len", str(limits.max_seq_len),
                "--max_num_tokens", str(limits.max_num_tokens)]
    return cmd


def trtllm_available() -> bool:
    return shutil.which("trtllm-build") is not None and (
        importlib.util.find_spec("tensorrt_llm") is not None)


def export_and_build(
    output: Path,
    *,
    config: GemmaConfig,
    quant: QuantConfig,
    weights: dict[str, Any],
    tokenizer: Any,
    limits=None,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    run_build: bool | None = None,  # None: when trtllm-build and tensorrt_llm are installed
) -> tuple[list[str], bool]:
    """Write ``output/`` atomically; returns (trtllm-build command, whether it ran)."""
    output = Path(output)
    if output.exists() and not (overwrite and (output / EXPORT_JSON).is_file()):
        raise CheckpointError(f"{output}: already exists" + (
            "" if overwrite else " (pass --overwrite to replace it)") + (
            "; not a trt-gemma TensorRT-LLM export, not replacing it" if overwrite else ""))
    tensors = trtllm_tensors(config, weights, dtype)
    run = trtllm_available() if run_build is None else run_build
    final_cmd = build_command(output / CHECKPOINT_DIR, output / ENGINE_DIR, limits)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f"{output.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        ckpt = tmp / CHECKPOINT_DIR
        ckpt.mkdir()
        zero_point = any(isinstance(w, Int4Weight) and w.zeros is not None
                         for w in weights.values())
        (ckpt / "config.json").write_text(json.dumps(
            trtllm_config(config, quant, dtype, has_zero_point=zero_point), indent=2) + "\n")
        save_file(_unshared(tensors), ckpt / "rank0.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        meta = {"config": config.to_dict(), "quant": quant.to_dict(),
                "profile": limits.to_dict() if limits is not None else None,
                "trtllm_build_command": shlex.join(final_cmd),
                "runtime": runtime_settings(config, limits.max_seq_len if limits else None)}
        (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if run:
            cmd = build_command(ckpt, tmp / ENGINE_DIR, limits)
            log("running: " + shlex.join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise CheckpointError(f"trtllm-build failed (exit {proc.returncode}): {tail[0]}")
        if output.exists():
            shutil.rmtree(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_cmd, run
