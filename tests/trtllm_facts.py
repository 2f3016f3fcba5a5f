"""TensorRT-LLM's published facts about a Gemma checkpoint, re-stated to read our export with.

TensorRT-LLM cannot be installed here (it needs CUDA), so this module re-states, from its source
(NVIDIA/TensorRT-LLM main, 2025; file and function named at each fact), what its loading path
does with a checkpoint directory, and ``check_checkpoint`` replays it on an export:

1. config.json -> ``PretrainedConfig.from_dict`` -> ``GemmaConfig(**config)``
   (models/modeling_utils.py, models/gemma/config.py), with ``Mapping(**mapping)``
   (mapping.py) and ``QuantConfig(**quantization)`` (a dataclass: unknown keys are a TypeError).
2. rank{r}.safetensors -> ``preprocess_weights`` / ``preprocess_perlayer_weights``
   (modeling_utils.py): per-layer kv-cache reciprocal scales added; for W4A16_AWQ the int8
   ``weight`` is transposed and viewed as the model dtype (4 codes per element), the
   ``weights_scaling_factor`` transposed, the ``prequant_scaling_factor`` reshaped to [1, in].
3. ``GemmaForCausalLM(config)`` declares its parameters (models/gemma/model.py, layers/
   attention.py ``Attention``, layers/mlp.py ``GatedMLP``, layers/linear.py Column/RowLinear,
   quantization/layers.py ``FP8Linear``/``FP8RowLinear``/``WeightOnlyGroupwiseQuant*Linear``,
   quantization/quantize.py ``kv_cache_quantize``, layers/embedding.py ``Embedding``);
   ``PretrainedModel.load`` requires every declared name (lm_head exempt when the embedding is
   given) and each ``Parameter.value`` setter checks shape and dtype.

What is NOT re-stated: the interleaving ``preprocess_weights_for_mixed_gemm`` applies to INT4
codes (it keeps the shape, which is all ``load`` checks) and anything after loading (the build).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

ARCHITECTURES = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}
# PretrainedConfig.__init__ keyword-only arguments without a default
REQUIRED = ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# mapping.py Mapping.__init__ arguments
MAPPING_FIELDS = {"world_size", "rank", "gpus_per_node", "cp_size", "cp_config", "tp_size",
                  "pp_size", "moe_cluster_size", "moe_tp_size", "moe_ep_size", "attn_tp_size",
                  "attn_cp_size", "auto_parallel", "enable_attention_dp"}
# modeling_utils.py QuantConfig dataclass fields
QUANT_FIELDS = {"quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val",
                "use_meta_recipe", "has_zero_point", "pre_quant_scale", "exclude_modules",
                "mamba_ssm_cache_dtype"}
# quantization/mode.py QuantAlgo members our export may name, and KV_CACHE_QUANT_ALGO_LIST
QUANT_ALGOS = {None, "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ", "FP8",
               "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "MIXED_PRECISION"}
KV_CACHE_QUANT_ALGOS = {None, "FP8", "INT8", "NVFP4"}
# functional.py RotaryScalingType.from_string
ROTARY_SCALING_TYPES = {"none", "linear", "dynamic", "longrope", "llama3", "yarn", "mrope"}
# Gemma2ConfigGroup / Gemma3ConfigGroup (modeling_utils.py): read by GemmaDecoderLayer
GEMMA2_GROUP = ("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping")
GEMMA3_GROUP = ("query_pre_attn_scalar", "final_logit_softcapping", "_sliding_window_pattern",
                "rope_local_base_freq", "sliding_window")


class Nonconformance(AssertionError):
    """What TensorRT-LLM's loading path would reject (or load wrongly)."""


@dataclasses.dataclass
class Parsed:
    """The fields of a parsed config the model declaration reads."""

    architecture: str
    dtype: torch.dtype
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    tp: int
    quant_algo: str | None
    kv_cache_algo: str | None
    group_size: int
    has_zero_point: bool
    pre_quant_scale: bool
    sliding_pattern: int | None


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise Nonconformance(what)


def parse_config(d: dict) -> Parsed:
    """config.json as PretrainedConfig/GemmaConfig/Mapping/QuantConfig parse and validate it."""
    missing = [k for k in REQUIRED if k not in d]
    _need(not missing, f"PretrainedConfig: missing required {missing}")
    arch = d["architecture"]
    _need(arch in ARCHITECTURES, f"MODEL_MAP has no {arch!r}")
    _need(d["dtype"] in DTYPES, f"dtype {d['dtype']!r}")
    # GemmaDecoderLayer hard-codes rope_gpt_neox; the const rope tables follow the config's
    _need(d.get("position_embedding_type") == "rope_gpt_neox", "position_embedding_type")
    mapping = d.get("mapping") or {}
    _need(set(mapping) <= MAPPING_FIELDS, f"Mapping(): unexpected {set(mapping) - MAPPING_FIELDS}")
    tp, pp, cp = (mapping.get(k, 1) for k in ("tp_size", "pp_size", "cp_size"))
    _need(tp * pp * cp == mapping.get("world_size", 1),
          "Mapping: world_size must equal tp_size * pp_size * cp_size")
    _need(pp == 1 and cp == 1, "only tp is exported")
    q = d.get("quantization") or {}
    _need(set(q) <= QUANT_FIELDS, f"QuantConfig(): unexpected {set(q) - QUANT_FIELDS}")
    _need(q.get("quant_algo") in QUANT_ALGOS, f"QuantAlgo {q.get('quant_algo')!r}")
    _need(q.get("kv_cache_quant_algo") in KV_CACHE_QUANT_ALGOS, "kv_cache_quant_algo")
    scaling = d.get("rotary_scaling")
    if scaling is not None:
        kind = scaling.get("type", scaling.get("rope_type"))
        _need(kind in ROTARY_SCALING_TYPES, f"RotaryScalingType {kind!r}")
    sliding = None
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        # GemmaConfig asserts it; GemmaDecoderLayer takes sqrt of it
        _need(d.get("query_pre_attn_scalar") is not None, "query_pre_attn_scalar required")
    if arch == "Gemma2ForCausalLM":
        _need(all(k in d for k in GEMMA2_GROUP), "Gemma2ConfigGroup fields")
    if arch == "Gemma3ForCausalLM":
        _need(all(k in d for k in GEMMA3_GROUP), "Gemma3ConfigGroup fields")
        sliding = d["_sliding_window_pattern"]
        _need(isinstance(sliding, int) and sliding >= 1, "_sliding_window_pattern must be an int")
        # create_attention_const_params builds the local rope table from it
        _need(isinstance(d["rope_local_base_freq"], (int, float)), "rope_local_base_freq")
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    return Parsed(
        architecture=arch, dtype=DTYPES[d["dtype"]], vocab_size=d["vocab_size"], hidden=hidden,
        layers=d["num_hidden_layers"], heads=heads,
        kv_heads=d.get("num_key_value_heads") or heads,
        head_size=d.get("head_size") or hidden // heads,
        intermediate=d.get("intermediate_size") or 4 * hidden, tp=tp,
        quant_algo=q.get("quant_algo"), kv_cache_algo=q.get("kv_cache_quant_algo"),
        group_size=q.get("group_size", 128), has_zero_point=q.get("has_zero_point", False),
        pre_quant_scale=q.get("pre_quant_scale", False), sliding_pattern=sliding)


Shape = tuple[int, ...]


def _linear(c: Parsed, prefix: str, in_full: int, out_full: int,
            column: bool) -> dict[str, tuple[Shape, torch.dtype]]:
    """Parameters one ColumnLinear/RowLinear (or its quantized replacement) declares on a rank."""
    if c.quant_algo == "W4A16_AWQ":  # pads global sizes up to max(64, group) * tp
        multiple = max(64, c.group_size) * c.tp
        in_full, out_full = (math.ceil(x / multiple) * multiple for x in (in_full, out_full))
    i = in_full if column else in_full // c.tp
    o = out_full // c.tp if column else out_full
    if c.quant_algo is None:
        return {f"{prefix}.weight": ((o, i), c.dtype)}
    if c.quant_algo == "FP8":
        return {f"{prefix}.weight": ((o, i), torch.float8_e4m3fn),
                f"{prefix}.weights_scaling_factor": ((1,), torch.float32),
                f"{prefix}.activation_scaling_factor": ((1,), torch.float32)}
    if c.quant_algo == "W4A16_AWQ":
        g = c.group_size
        out = {f"{prefix}.weight": ((i, o // 4), c.dtype),  # INT4 x4 packed in one fp16/bf16
               f"{prefix}.weights_scaling_factor": ((i // g, o), c.dtype)}
        if c.pre_quant_scale:
            out[f"{prefix}.prequant_scaling_factor"] = ((1, i), c.dtype)
        if c.has_zero_point:
            out[f"{prefix}.zero"] = ((i // g, o), c.dtype)
        return out
    raise Nonconformance(f"quant_algo {c.quant_algo} is not re-stated here")


def declared_parameters(c: Parsed) -> dict[str, tuple[Shape, torch.dtype]]:
    """What GemmaForCausalLM(config) declares on one tensor-parallel rank (all ranks alike)."""
    h, d, tp = c.hidden, c.head_size, c.tp
    _need(c.heads % tp == 0, "Attention: num_attention_heads must be divisible by tp_size")
    kv_rank = (c.kv_heads + tp - 1) // tp  # Attention.num_attention_kv_heads
    params: dict[str, tuple[Shape, torch.dtype]] = {}
    # use_parallel_embedding is forced to tp > 1 (gemma/config.py), sharding_dim 0
    params["transformer.vocab_embedding.weight"] = (
        (math.ceil(c.vocab_size / tp), h), c.dtype)
    for n in range(c.layers):
        p = f"transformer.layers.{n}."
        norms = ["input_layernorm", "post_layernorm"]
        if c.architecture != "GemmaForCausalLM":  # inter_layernorms
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for norm in norms:
            params[f"{p}{norm}.weight"] = ((h,), c.dtype)
        if c.architecture == "Gemma3ForCausalLM":  # qk_layernorm, layernorm_share
            params[p + "attention.q_layernorm.weight"] = ((d,), c.dtype)
            params[p + "attention.k_layernorm.weight"] = ((d,), c.dtype)
        qkv_out = tp * (c.heads // tp) * d + 2 * tp * kv_rank * d
        params.update(_linear(c, p + "attention.qkv", h, qkv_out, column=True))
        params.update(_linear(c, p + "attention.dense", tp * (c.heads // tp) * d, h,
                              column=False))
        params.update(_linear(c, p + "mlp.fc", h, c.intermediate, column=True))
        params.update(_linear(c, p + "mlp.gate", h, c.intermediate, column=True))
        params.update(_linear(c, p + "mlp.proj", c.intermediate, h, column=False))
        if c.kv_cache_algo is not None:  # quantize.py kv_cache_quantize
            params[p + "attention.kv_cache_scaling_factor"] = ((1,), torch.float32)
            params[p + "attention.kv_cache_rcp_scaling_factor"] = ((1,), torch.float32)
    params["transformer.ln_f.weight"] = ((h,), c.dtype)
    vocab_padded = math.ceil(c.vocab_size / tp) * tp  # _utils.pad_vocab_size
    params["lm_head.weight"] = ((vocab_padded // tp, h), c.dtype)  # excluded from quantization
    return params


def preprocess_weights(weights: dict[str, torch.Tensor], c: Parsed) -> dict[str, torch.Tensor]:
    """modeling_utils.py preprocess_weights / preprocess_perlayer_weights, shapes and dtypes."""
    w = dict(weights)
    for name, t in list(w.items()):  # process_kv_scaling_factor
        if name.endswith(".kv_cache_scaling_factor"):
            rcp = name.replace("kv_cache_scaling_factor", "kv_cache_rcp_scaling_factor")
            w.setdefault(rcp, torch.reciprocal(t))
    for name, t in list(w.items()):
        if c.quant_algo == "W4A16_AWQ":
            if name.endswith("weight") and t.dtype == torch.int8:
                w[name] = t.transpose(-1, -2).contiguous().view(c.dtype)
            if name.endswith("weights_scaling_factor"):
                w[name] = t.transpose(-1, -2).contiguous().to(c.dtype)
            if name.endswith("prequant_scaling_factor"):
                w[name] = t.reshape(1, -1)
        elif c.quant_algo == "FP8" and name.endswith("weight") and t.dtype == torch.int8:
            w[name] = t.view(torch.float8_e4m3fn)
    return w


def load(declared: dict[str, tuple[Shape, torch.dtype]], weights: dict[str, torch.Tensor]):
    """PretrainedModel.load: every declared name given (lm_head exempt beside the embedding),
    each value of the declared shape and dtype. Extra tensors only draw a warning there; here
    they are reported too (an export should not carry what is ignored)."""
    problems = []
    for name, (shape, dtype) in declared.items():
        if name not in weights:
            if name == "lm_head.weight" and "transformer.vocab_embedding.weight" in weights:
                continue
            problems.append(f"missing {name}")
            continue
        t = weights[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            problems.append(f"{name}: {tuple(t.shape)} {t.dtype}, declared {shape} {dtype}")
    problems += [f"not declared: {n}" for n in sorted(set(weights) - set(declared))]
    return problems


def check_checkpoint(ckpt_dir: str | Path) -> Parsed:
    """Replay TensorRT-LLM's loading of every rank of a checkpoint; Nonconformance on failure."""
    ckpt_dir = Path(ckpt_dir)
    c = parse_config(json.loads((ckpt_dir / "config.json").read_text()))
    declared = declared_parameters(c)
    ranks = sorted(ckpt_dir.glob("rank*.safetensors"))
    _need([p.name for p in ranks] == [f"rank{r}.safetensors" for r in range(c.tp)],
          f"expected rank0..rank{c.tp - 1}.safetensors, found {[p.name for p in ranks]}")
    for path in ranks:
        problems = load(declared, preprocess_weights(load_file(path), c))
        _need(not problems, f"{path.name}: " + "; ".join(problems[:5]))
    return c


def layer_rope(d: dict, layer: int) -> tuple[float, float]:
    """(rope base, linear position scale) TensorRT-LLM's engine applies on a layer of config.json
    ``d``: models/gemma/model.py GemmaDecoderLayer makes a Gemma 3 layer local iff
    ``(layer + 1) % _sliding_window_pattern`` and gives it ``rope_local_base_freq``; layers/
    attention.py create_attention_const_params builds both rope tables with the same
    ``rotary_scaling`` (linear: positions divided by its factor)."""
    scaling = d.get("rotary_scaling") or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    scale = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    base = float(d.get("rotary_base", 10000.0))
    if d["architecture"] == "Gemma3ForCausalLM" and (layer + 1) % d["_sliding_window_pattern"]:
        base = float(d["rope_local_base_freq"])
    return base, scale


def expand_windows(pattern: list[int], layers: int) -> list[int]:
    """The per-layer windows a runner derives from a shorter list (llmapi/llm_args.py
    KvCacheConfig.max_attention_window: repeated to the number of layers)."""
    return [pattern[i % len(pattern)] for i in range(layers)]
