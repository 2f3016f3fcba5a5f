"""TensorRT-LLM backend: export a TensorRT-LLM checkpoint, then run (or print) ``trtllm-build``.

The checkpoint is the one ``trtllm-build --checkpoint_dir`` reads: ``config.json`` plus one
``rank{r}.safetensors`` per tensor-parallel rank (``trtllm_shard.py``; pp = 1). It is converted
from the very tensors the native engine would store (``trtllm_weights.py``), so both backends run
the same quantized weights. Format followed, as read in NVIDIA/TensorRT-LLM (main, 2025; Gemma 3
support arrived in v0.19/v0.20):

- docs/source/architecture/checkpoint.md: config fields, ``mapping``, ``quantization`` block,
  tensor and scale names (``weights_scaling_factor``, ``activation_scaling_factor``,
  ``prequant_scaling_factor``, ``attention.kv_cache_scaling_factor``).
- tensorrt_llm/models/gemma/config.py: architectures ``GemmaForCausalLM``, ``Gemma2ForCausalLM``,
  ``Gemma3ForCausalLM``; Gemma 2 fields ``query_pre_attn_scalar``, ``final_logit_softcapping``,
  ``attn_logit_softcapping``; Gemma 3 fields ``query_pre_attn_scalar``,
  ``final_logit_softcapping``, ``_sliding_window_pattern``, ``rope_local_base_freq``,
  ``sliding_window`` (modeling_utils.py ``Gemma2ConfigGroup``/``Gemma3ConfigGroup``);
  ``use_parallel_embedding`` is forced to ``tp_size > 1``.
- tensorrt_llm/models/gemma/convert.py (``HfParser.rename_to_trt_llm``, ``load_gemma_weights``):
  q/k/v fused into ``attention.qkv``, o_proj -> ``attention.dense``, gate_proj -> ``mlp.fc`` (the
  activated branch), up_proj -> ``mlp.gate``, down_proj -> ``mlp.proj``; Gemma 1's pre-MLP norm and
  Gemma 2/3's post-attention norm -> ``post_layernorm``; q/k norms -> ``attention.q_layernorm`` /
  ``k_layernorm``; every RMSNorm weight stored as ``1 + w`` (TensorRT-LLM's RmsNorm multiplies by
  w); ``lm_head.weight`` written as a copy of the embedding.
- tensorrt_llm/models/gemma/model.py: ``hidden_act`` feeds ``GatedMLP``; TensorRT-LLM's ``gelu``
  (functional.py) is the tanh approximation Gemma uses. Local layers (``(i + 1) %
  _sliding_window_pattern != 0``) only switch the rope base: the window is a run-time setting
  (trt_gemma/trtllm_layout.py), written beside the engine and printed in the hint.
- Rope scaling: layers/attention.py ``Attention.create_attention_const_params`` builds the local
  rope table (``rope_local_base_freq``) with the same ``rotary_scaling`` as the global one, so a
  linear factor would stretch local layers too, which Gemma 3 never does; TensorRT-LLM's own
  converter (gemma/config.py ``from_hugging_face`` reads ``rotary_scaling``, a field HF configs do
  not have) drops it and gets global layers wrong. No TensorRT-LLM release we could read scales
  global layers only, so Gemma 3 with a factor != 1 (4B/12B/27B) is refused, never exported wrong.

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
from trt_gemma.converter.trtllm_shard import check_tensor_parallel, rank_tensors
from trt_gemma.converter.trtllm_weights import (  # noqa: F401 (re-exported for callers)
    pack_int4_rows,
    unpack_int4_rows,
    zero_term,
)
from trt_gemma.errors import CheckpointError, ConfigError
from trt_gemma.kernels.gemm_w4a16 import Int4Weight
from trt_gemma.trtllm_layout import (CHECKPOINT_DIR, ENGINE_DIR, EXPORT_JSON, RUNTIME_JSON,
                                     TOKENIZER_DIR, runtime_settings)

ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM"}
QUANT_ALGOS = {"none": None, "fp8": "FP8", "int4-awq": "W4A16_AWQ", "int4": "W4A16_AWQ"}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# config.json ---------------------------------------------------------------------------------


def _sliding_pattern(config: GemmaConfig) -> int:
    """Gemma 3's period P: TensorRT-LLM makes layer i global iff (i + 1) % P == 0."""
    n = config.num_hidden_layers
    for p in range(1, n + 2):
        if all((config.layer_types[i] == FULL) == ((i + 1) % p == 0) for i in range(n)):
            return p
    raise ConfigError("TensorRT-LLM export: Gemma 3 layer types do not follow one period of "
                      "local layers then a global one; TensorRT-LLM cannot express them")


def check_rope(config: GemmaConfig) -> None:
    """Refuse what TensorRT-LLM's engine would get wrong (module docstring, "Rope scaling")."""
    if config.architecture == "gemma3" and config.rope_scaling_factor != 1.0:
        raise ConfigError(
            f"TensorRT-LLM export refused: this Gemma 3 scales rope positions by "
            f"{config.rope_scaling_factor:g} on global layers only, but TensorRT-LLM's Gemma "
            "model applies rotary_scaling to local and global layers alike (and without it, "
            "global layers are wrong), so its engine would be wrong either way")


def check_exportable(config: GemmaConfig, quant: QuantConfig, tp_size: int = 1) -> None:
    """Every refusal of the export, cheap enough to run before calibration."""
    check_rope(config)
    if config.architecture == "gemma3":
        _sliding_pattern(config)
    check_tensor_parallel(config, quant, tp_size)


def trtllm_config(config: GemmaConfig, quant: QuantConfig, dtype: torch.dtype,
                  has_zero_point: bool = False, tp_size: int = 1) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (``has_zero_point``: INT4 with zero points)."""
    check_rope(config)
    arch = ARCHITECTURES[config.architecture]
    scaling = None
    if config.rope_scaling_factor != 1.0:  # Gemma 1/2: one rope for every layer, as in HF
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
        # what gemma/config.py forces anyway: vocab-parallel embedding whenever tp > 1
        "use_parallel_embedding": tp_size > 1,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1},
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


# rank{r}.safetensors -------------------------------------------------------------------------


def trtllm_tensors(config: GemmaConfig, weights: dict[str, Any],
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our engine tensors -> TensorRT-LLM's tensors of a single GPU (rank 0 of tp = 1)."""
    return rank_tensors(config, weights, dtype, 1)[0]


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
    """The ``trtllm-build`` command line for a checkpoint and a resolved build profile (every
    rank of a tp > 1 checkpoint is built by the one command: it reads ``mapping``)."""
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
    tp_size: int = 1,
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
    check_exportable(config, quant, tp_size)
    zero_point = any(isinstance(w, Int4Weight) and w.zeros is not None for w in weights.values())
    trt_config = trtllm_config(config, quant, dtype, has_zero_point=zero_point, tp_size=tp_size)
    ranks = rank_tensors(config, weights, dtype, tp_size)
    run = trtllm_available() if run_build is None else run_build
    final_cmd = build_command(output / CHECKPOINT_DIR, output / ENGINE_DIR, limits)
    settings = runtime_settings(config, limits.max_seq_len if limits else None)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f"{output.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        ckpt = tmp / CHECKPOINT_DIR
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps(trt_config, indent=2) + "\n")
        for r, tensors in enumerate(ranks):
            save_file(_unshared(tensors), ckpt / f"rank{r}.safetensors",
                      metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        meta = {"config": config.to_dict(), "quant": quant.to_dict(),
                "profile": limits.to_dict() if limits is not None else None,
                "tp_size": tp_size,
                "trtllm_build_command": shlex.join(final_cmd),
                "runtime": settings}
        (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if run:
            cmd = build_command(ckpt, tmp / ENGINE_DIR, limits)
            log("running: " + shlex.join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise CheckpointError(f"trtllm-build failed (exit {proc.returncode}): {tail[0]}")
            # the engine directory carries its run-time settings beside TensorRT-LLM's config
            (tmp / ENGINE_DIR).mkdir(exist_ok=True)
            (tmp / ENGINE_DIR / RUNTIME_JSON).write_text(json.dumps(
                {**settings, "tp_size": tp_size}, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_cmd, run
