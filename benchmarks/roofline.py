"""The decode roofline on paper: bytes one decode step reads, and the step time they predict.

A decode step (one new token for each of ``batch`` sequences) is memory-bound: every weight is
read once whatever the batch, plus each sequence's KV cache. So the fastest a step can be is
``bytes / peak HBM bandwidth``, and on top of that every kernel launch costs a few microseconds
that no bandwidth buys back. This script does that arithmetic for the released Gemma shapes
(``trt_gemma.config.PRESETS``), each weight format we build (bf16, fp8, int4-awq with groups of
128) and KV-cache dtype (bf16, fp8), at 1k and 8k tokens of context, batch 1 and 64, on four GPUs:

    step time = bytes / peak bandwidth + launches * LAUNCH_US
    launches  = num_hidden_layers * DECODE_LAUNCHES_PER_LAYER + sum(STEP_LAUNCHES)

What a step reads, exactly as our formats store it (``kernels/gemm_fp8.py``,
``kernels/gemm_w4a16.py``, ``trt_gemma/converter/quantize.py``):

- each decoder linear (q, k, v, o, gate, up, down) once: bf16 ``2*out*in``; fp8 e4m3 codes
  ``out*in`` + fp32 per-channel ``weight_scale`` ``4*out`` + fp32 static ``input_scale`` 4;
  int4-awq codes ``out*in/2`` + bf16 ``scales`` and uint8 ``zeros`` ``[out, ceil(in/128)]`` + bf16
  ``pre_quant_scale`` ``2*in`` (zero points: the converter's INT4 is asymmetric; every linear of a
  q/k/v or gate/up group stores and reads its own copy of the group's pre_quant_scale);
- the RMSNorm factors as the model applies them: ``(1 + w)`` in fp32, made once at load
  (``ops.norm_scale``); QK-norm's factor is one ``[heads + kv_heads, head_dim]`` tensor;
- the embedding rows of the batch's tokens (``batch * hidden * 2``), not the whole table;
- the LM head: tied to the embedding and never quantized by default, so the full
  ``[vocab, hidden]`` bf16 matrix every step;
- each sequence's KV cache: per layer ``2 * kv_heads * head_dim * bytes * min(context, window)``
  (sliding layers read only their window: ``config.layer_window``), plus with an fp8 cache the
  per-layer fp32 ``k_scale``/``v_scale``.

Not counted: the step's writes (one token's K/V per layer, the logits) and the activations
between kernels (at batch 64 a few MB per layer, mostly served from L2): small next to the weights.

    python benchmarks/roofline.py                          # stdout table
    python benchmarks/roofline.py --output-json benchmarks/results/roofline.json
    python benchmarks/roofline.py --write-docs             # the section in docs/kernels.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from trt_gemma.config import GemmaConfig, preset

# Kernels per decoder layer of a decode step on the fused GPU path, as benchmarks/launch_count.py
# counts them (10.2 per layer measured on Gemma 3 270M in bf16, 3 of them once per step): the qkv
# GEMM; q/k norm + rope + KV-cache write; paged decode attention and its split reduce (no reduce
# when one split fills the GPU); the o GEMM; post-attention norm + residual + pre-feedforward
# norm; the gate/up GEMM; GeGLU; the down GEMM; post-feedforward norm + residual + the next
# layer's input norm. Every extra kernel per layer costs num_hidden_layers * LAUNCH_US per step.
DECODE_LAUNCHES_PER_LAYER = 10
# Kernels once per step, outside the decoder layers (the final norm rides on the last layer's
# add + norm).
STEP_LAUNCHES = {"embedding": 2, "first_input_norm": 1, "lm_head": 1, "sampling": 2}
LAUNCH_US = 2.5  # cost of one kernel launch, microseconds (no overlap assumed)

MODELS = ("gemma-2b", "gemma-7b", "gemma-2-9b", "gemma-3-4b", "gemma-3-27b")
WEIGHT_MODES = ("bf16", "fp8", "int4-awq")
KV_DTYPES = ("bf16", "fp8")
CONTEXTS = (1024, 8192)
BATCHES = (1, 64)
GROUP_SIZE = 128  # int4-awq input channels per scale
ACT_BYTES = 2  # bf16: activations, dense weights, embedding, LM head, INT4 scales
KV_BYTES = {"bf16": 2, "fp8": 1}

DOCS = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"
BEGIN, END = "<!-- roofline:begin -->", "<!-- roofline:end -->"


@dataclass(frozen=True)
class Gpu:
    """Datasheet peaks of one GPU."""

    name: str
    hbm_tbs: float  # peak memory bandwidth, TB/s (10**12 bytes/s)
    memory_gb: float  # device memory, GB (10**9 bytes)
    bf16_tflops: float  # dense bf16 tensor-core peak (fp32 accumulate), no sparsity
    fp8_tflops: float  # dense fp8 tensor-core peak (fp32 accumulate), no sparsity
    source: str


# Datasheets quote tensor-core peaks "with sparsity": the dense figures below are half of them.
GPUS = (
    Gpu("H100 SXM", 3.35, 80, 989.5, 1979.0, "NVIDIA H100 Tensor Core GPU datasheet"),
    Gpu("H200", 4.8, 141, 989.5, 1979.0, "NVIDIA H200 Tensor Core GPU datasheet"),
    Gpu("L4", 0.300, 24, 121.0, 242.5, "NVIDIA L4 Tensor Core GPU datasheet"),
    Gpu("RTX 4090", 1.008, 24, 165.2, 330.3, "NVIDIA Ada Lovelace GPU architecture whitepaper"),
)


# --------------------------------------------------------------------------------------------
# Bytes


def linear_shapes(config: GemmaConfig) -> list[tuple[str, int, int]]:
    """(name, out, in) of one decoder layer's linears, in forward order."""
    h, i = config.hidden_size, config.intermediate_size
    return [("q_proj", config.q_size, h), ("k_proj", config.kv_size, h),
            ("v_proj", config.kv_size, h), ("o_proj", h, config.q_size),
            ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]


def linear_bytes(out: int, inp: int, weights: str, group_size: int = GROUP_SIZE) -> int:
    """Stored bytes of one ``[out, in]`` linear weight in a weight format (all its tensors)."""
    if weights == "bf16":
        return out * inp * ACT_BYTES
    if weights == "fp8":
        return out * inp + 4 * out + 4  # e4m3 codes, fp32 weight_scale [out], fp32 input_scale
    if weights == "int4-awq":
        groups = -(-inp // group_size)
        # packed codes, bf16 scales + uint8 zeros per group, bf16 pre_quant_scale [in]
        return out * inp // 2 + out * groups * (ACT_BYTES + 1) + inp * ACT_BYTES
    raise ValueError(f"unknown weight format {weights!r}; expected one of {WEIGHT_MODES}")


def decoder_linear_bytes(config: GemmaConfig, weights: str) -> int:
    per_layer = sum(linear_bytes(o, i, weights) for _, o, i in linear_shapes(config))
    return config.num_hidden_layers * per_layer


def norm_read_bytes(config: GemmaConfig) -> int:
    """The fp32 ``(1 + w)`` factors the model multiplies by (``ops.norm_scale``), final included."""
    per_layer = config.hidden_size * (4 if config.use_post_norms else 2)
    if config.use_qk_norm:  # one [heads + kv_heads, head_dim] factor for q and k together
        per_layer += (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
    return 4 * (config.num_hidden_layers * per_layer + config.hidden_size)


def norm_stored_bytes(config: GemmaConfig) -> int:
    """The norm weights as the checkpoint and the engine store them (bf16)."""
    per_layer = config.hidden_size * (4 if config.use_post_norms else 2)
    per_layer += 2 * config.head_dim if config.use_qk_norm else 0
    return ACT_BYTES * (config.num_hidden_layers * per_layer + config.hidden_size)


def stored_weight_bytes(config: GemmaConfig, weights: str) -> int:
    """Bytes of all weights in device memory: linears, the whole (tied) embedding, norms."""
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size * ACT_BYTES
    return (decoder_linear_bytes(config, weights) + norm_stored_bytes(config) + head
            + config.vocab_size * config.hidden_size * ACT_BYTES)


def kv_read_bytes(config: GemmaConfig, context: int, batch: int, kv_dtype: str) -> int:
    """KV-cache bytes the decode attention of ``batch`` sequences of ``context`` tokens reads."""
    per_token_layer = 2 * config.kv_size * KV_BYTES[kv_dtype]
    tokens = sum(min(context, config.layer_window(i) or context)
                 for i in range(config.num_hidden_layers))
    scales = 8 * config.num_hidden_layers if kv_dtype == "fp8" else 0  # fp32 k_scale, v_scale
    return batch * per_token_layer * tokens + scales


def step_bytes(config: GemmaConfig, weights: str, kv_dtype: str, context: int,
               batch: int) -> dict[str, int]:
    """What one decode step reads, by part, and the total."""
    parts = {
        "decoder_linears": decoder_linear_bytes(config, weights),
        "norms": norm_read_bytes(config),
        "embedding_rows": batch * config.hidden_size * ACT_BYTES,
        "lm_head": config.vocab_size * config.hidden_size * ACT_BYTES,
        "kv_cache": kv_read_bytes(config, context, batch, kv_dtype),
    }
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------
# FLOPs and time


def step_flops(config: GemmaConfig, context: int, batch: int) -> dict[str, int]:
    """Multiply-adds x 2 of one step: decoder GEMMs, LM head, attention (QK^T and PV)."""
    per_token = sum(o * i for _, o, i in linear_shapes(config)) * config.num_hidden_layers
    keys = sum(min(context, config.layer_window(i) or context)
               for i in range(config.num_hidden_layers))
    return {
        "decoder_linears": 2 * batch * per_token,
        "lm_head": 2 * batch * config.vocab_size * config.hidden_size,
        "attention": 4 * batch * config.num_attention_heads * config.head_dim * keys,
    }


def launches_per_step(config: GemmaConfig) -> int:
    return config.num_hidden_layers * DECODE_LAUNCHES_PER_LAYER + sum(STEP_LAUNCHES.values())


def compute_seconds(flops: dict[str, int], weights: str, gpu: Gpu) -> dict[str, float]:
    """Tensor-core time of the GEMMs (decoder linears + LM head) and of attention: fp8 weights
    run FP8 GEMMs (``torch._scaled_mm``, sm89+); the W4A16 kernel, the LM head and attention
    multiply in bf16."""
    linear_peak = gpu.fp8_tflops if weights == "fp8" else gpu.bf16_tflops
    return {
        "gemms": (flops["decoder_linears"] / (linear_peak * 1e12)
                  + flops["lm_head"] / (gpu.bf16_tflops * 1e12)),
        "attention": flops["attention"] / (gpu.bf16_tflops * 1e12),
    }


def predict(config: GemmaConfig, weights: str, kv_dtype: str, context: int, batch: int,
            gpu: Gpu) -> dict:
    nbytes = step_bytes(config, weights, kv_dtype, context, batch)
    bw = gpu.hbm_tbs * 1e12
    memory_s = nbytes["total"] / bw
    launch_s = launches_per_step(config) * LAUNCH_US * 1e-6
    step_s = memory_s + launch_s
    compute = compute_seconds(step_flops(config, context, batch), weights, gpu)
    gemm_memory_s = memory_s - nbytes["kv_cache"] / bw
    # Each kernel is bound by the larger of its memory and tensor-core time: the GEMMs and the
    # attention separately (attention never reaches its compute bound at these shapes).
    bound_s = (max(gemm_memory_s, compute["gemms"])
               + max(nbytes["kv_cache"] / bw, compute["attention"]) + launch_s)
    resident = stored_weight_bytes(config, weights) + kv_read_bytes(config, context, batch,
                                                                    kv_dtype)
    return {
        "step_ms": step_s * 1e3,
        "memory_ms": memory_s * 1e3,
        "launch_ms": launch_s * 1e3,
        "tokens_per_s": batch / step_s,
        "launch_share": launch_s / step_s,
        "compute_ms": sum(compute.values()) * 1e3,
        "compute_over_memory": sum(compute.values()) / memory_s,
        "gemm_compute_over_memory": compute["gemms"] / gemm_memory_s,
        "kernel_bound_step_ms": bound_s * 1e3,  # per-kernel max(memory, compute) + launches
        "fits": resident <= gpu.memory_gb * 1e9,  # weights + KV only, no workspace
    }


def gemm_crossover_batch(config: GemmaConfig, weights: str, gpu: Gpu) -> int:
    """Smallest batch at which the GEMMs (decoder linears + LM head) take longer on the tensor
    cores than reading their weights: where they stop being memory-bound."""
    weight_bytes = (decoder_linear_bytes(config, weights)
                    + config.vocab_size * config.hidden_size * ACT_BYTES)
    per_seq = compute_seconds(step_flops(config, 1, 1), weights, gpu)["gemms"]
    return math.ceil(weight_bytes / (gpu.hbm_tbs * 1e12) / per_seq)


def attention_flops_per_byte(config: GemmaConfig, kv_dtype: str) -> float:
    """Attention's arithmetic intensity: 4*heads*head_dim FLOPs per 2*kv_heads*head_dim*bytes."""
    return 2 * config.num_attention_heads / (config.num_key_value_heads * KV_BYTES[kv_dtype])


# --------------------------------------------------------------------------------------------
# Output


def roofline() -> dict:
    """Every model x weights x KV dtype x context x batch, on every GPU (what --output-json
    writes)."""
    models = {}
    for name in MODELS:
        cfg = preset(name)
        rows = []
        for weights in WEIGHT_MODES:
            for kv in KV_DTYPES:
                for context in CONTEXTS:
                    for batch in BATCHES:
                        rows.append({
                            "weights": weights, "kv_cache": kv, "context": context,
                            "batch": batch,
                            "bytes": step_bytes(cfg, weights, kv, context, batch),
                            "flops": step_flops(cfg, context, batch),
                            "gpus": {g.name: predict(cfg, weights, kv, context, batch, g)
                                     for g in GPUS},
                        })
        models[name] = {
            "config": {k: getattr(cfg, k) for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "sliding_window")},
            "sliding_layers": sum(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)),
            "launches_per_step": launches_per_step(cfg),
            "stored_weight_bytes": {w: stored_weight_bytes(cfg, w) for w in WEIGHT_MODES},
            "gemm_crossover_batch": {w: {g.name: gemm_crossover_batch(cfg, w, g) for g in GPUS}
                                     for w in WEIGHT_MODES},
            "attention_flops_per_byte": {kv: attention_flops_per_byte(cfg, kv)
                                         for kv in KV_DTYPES},
            "rows": rows,
        }
    return {
        "method": "step time = bytes / peak HBM bandwidth + launches * launch_us",
        "decode_launches_per_layer": DECODE_LAUNCHES_PER_LAYER,
        "step_launches": STEP_LAUNCHES,
        "launch_us": LAUNCH_US,
        "int4_group_size": GROUP_SIZE,
        "gpus": [vars(g) for g in GPUS],
        "models": models,
    }


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _tps(p: dict) -> str:
    return f"{p['tokens_per_s']:,.0f}" + ("" if p["fits"] else "†")


def stdout_table(data: dict) -> str:
    head = f"{'model':<12} {'weights':<9} {'kv':<5} {'ctx':>5} {'batch':>5} {'GB':>7}"
    head += "".join(f" {g['name'] + ' ms':>12} {'tok/s':>8}" for g in data["gpus"])
    lines = [head, "-" * len(head)]
    for name, m in data["models"].items():
        for r in m["rows"]:
            line = (f"{name:<12} {r['weights']:<9} {r['kv_cache']:<5} {r['context']:>5} "
                    f"{r['batch']:>5} {_gb(r['bytes']['total']):>7}")
            for g in data["gpus"]:
                p = r["gpus"][g["name"]]
                line += f" {p['step_ms']:>12.3f} {_tps(p):>8}"
            lines.append(line)
    lines.append("† weights + KV exceed the GPU's memory")
    return "\n".join(lines)


def _model_table(name: str, m: dict, gpus: list[dict]) -> list[str]:
    c = m["config"]
    window = (f", {m['sliding_layers']} of them sliding (window {c['sliding_window']})"
              if m["sliding_layers"] else ", all full attention")
    launches = m["launches_per_step"]
    w = m["stored_weight_bytes"]
    out = [
        f"### {name}",
        "",
        f"{c['num_hidden_layers']} layers{window}; hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']} query / {c['num_key_value_heads']} KV heads of "
        f"{c['head_dim']}, vocab {c['vocab_size']}. Weights in memory: "
        f"{_gb(w['bf16'])} / {_gb(w['fp8'])} / {_gb(w['int4-awq'])} GB (bf16 / fp8 / int4-awq). "
        f"{launches} launches per step = {launches * LAUNCH_US / 1e3:.2f} ms.",
        "",
        "| weights | KV | context | GB read b1 · b64 | "
        + " | ".join(f"{g['name']} tok/s b1 · b64" for g in gpus)
        + " | launch share b1 (" + " · ".join(g["name"] for g in gpus) + ") | measured |",
        "|---|---|---:|---:|" + "---:|" * len(gpus) + "---:|---|",
    ]
    by_key = {(r["weights"], r["kv_cache"], r["context"], r["batch"]): r for r in m["rows"]}
    for weights in WEIGHT_MODES:
        for kv in KV_DTYPES:
            for ctx in CONTEXTS:
                r1, r64 = (by_key[(weights, kv, ctx, b)] for b in BATCHES)
                cells = [weights, kv, f"{ctx // 1024}k",
                         f"{_gb(r1['bytes']['total'])} · {_gb(r64['bytes']['total'])}"]
                cells += [f"{_tps(r1['gpus'][g['name']])} · {_tps(r64['gpus'][g['name']])}"
                          for g in gpus]
                cells.append(" · ".join(f"{r1['gpus'][g['name']]['launch_share']:.0%}"
                                        for g in gpus))
                cells.append("")
                out.append("| " + " | ".join(cells) + " |")
    return out


def _compute_table(data: dict) -> list[str]:
    gpus = data["gpus"]
    out = [
        "| model | weights | " + " | ".join(f"{g['name']}: GEMMs b64 (crossover)"
                                           for g in gpus)
        + " | attention FLOPs/byte (bf16 · fp8 KV) |",
        "|---|---|" + "---:|" * (len(gpus) + 1),
    ]
    for name, m in data["models"].items():
        intensity = " · ".join(f"{v:g}" for v in m["attention_flops_per_byte"].values())
        for weights in WEIGHT_MODES:
            r = next(r for r in m["rows"] if r["weights"] == weights and r["batch"] == 64)
            cells = [f"{r['gpus'][g['name']]['gemm_compute_over_memory']:.2f} "
                     f"({m['gemm_crossover_batch'][weights][g['name']]})" for g in gpus]
            out.append(f"| {name} | {weights} | " + " | ".join(cells) + f" | {intensity} |")
    return out


def docs_section(data: dict) -> str:
    gpus = data["gpus"]
    per_step = " + ".join(f"{n} {k}" for k, n in STEP_LAUNCHES.items())
    lines = [
        "Written by `python benchmarks/roofline.py --write-docs` (numbers also in "
        "`--output-json`). A decode step reads every decoder weight once whatever the batch, "
        "plus each sequence's KV cache, so its floor is **bytes / peak HBM bandwidth**; each "
        f"kernel launch adds {LAUNCH_US} µs on top. Predicted step time = bytes / bandwidth + "
        f"launches × {LAUNCH_US} µs, launches = layers × {DECODE_LAUNCHES_PER_LAYER} "
        f"(`DECODE_LAUNCHES_PER_LAYER`, as `benchmarks/launch_count.py` counts them: qkv GEMM, "
        "QK-norm + rope + KV write, decode attention and its split reduce, o GEMM, "
        "post-attention norm + residual + pre-FF norm, gate/up GEMM, GeGLU, down GEMM, post-FF "
        "norm + residual + next input norm) + "
        f"{sum(STEP_LAUNCHES.values())} per step "
        f"({per_step}); tokens/s = batch / step time. Shapes: `trt_gemma.config.PRESETS` (the "
        "released models' config.json values); context = keys the new token attends to, "
        "1k = 1024, 8k = 8192; GB = 10^9 bytes.",
        "",
        "Bytes counted, as our formats store them: each decoder linear once (bf16 `2·out·in`; "
        "fp8 `out·in` + fp32 per-channel scale + fp32 input scale; int4-awq g128 `out·in/2` + "
        "bf16 scale and uint8 zero per group + bf16 `pre_quant_scale [in]`, one per linear); "
        "the fp32 `(1 + w)` RMSNorm factors the model applies; the embedding rows of the "
        "batch's tokens only; the LM head, tied to the embedding and kept bf16, so the whole "
        "`[vocab, hidden]` matrix every step; and per sequence, per layer, "
        "`2 · kv_heads · head_dim · bytes · min(context, window)` of KV (sliding layers read "
        "only their window; fp8 KV adds two fp32 scales per layer). Not counted: the step's "
        "writes (one token's K/V, logits) and activations between kernels (a few MB per layer "
        "at batch 64, largely L2-resident).",
        "",
        "Peak bandwidths and dense tensor-core peaks (datasheet figures; tensor-core peaks are "
        "quoted there with sparsity, halved here):",
        "",
        "| GPU | HBM / GDDR bandwidth | memory | bf16 dense | fp8 dense | source |",
        "|---|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {g['name']} | {g['hbm_tbs'] * 1000:,.0f} GB/s | {g['memory_gb']:.0f} GB | "
              f"{g['bf16_tflops']:.1f} TFLOPS | {g['fp8_tflops']:.1f} TFLOPS | {g['source']} |"
              for g in gpus]
    lines += [
        "",
        "Tables: tokens/s at batch 1 and 64; `†`: weights + KV cache exceed the GPU's memory "
        "(workspace not even counted), so the figure is not reachable there. \"launch share\" is "
        "the part of a batch-1 step that launches take: on the fastest GPUs and the smaller "
        "models it is a large part of the step, which is why the launch count per layer is a "
        "budget (fusing kernels, CUDA graphs). The \"measured\" column is for a GPU run to "
        "fill in (GPU, tok/s at b1 · b64).",
        "",
    ]
    for name, m in data["models"].items():
        lines += _model_table(name, m, gpus) + [""]
    lines += [
        "### Compute check: where decode stops being memory-bound",
        "",
        "FLOPs of a step at batch B: `2·B` per decoder weight element, `2·B·vocab·hidden` for "
        "the LM head, `4·B·heads·head_dim` per key attention reads. Tensor-core time uses the "
        "fp8 peak for fp8 weights (FP8 GEMMs on sm89+) and the bf16 peak for the rest (the "
        "W4A16 kernel multiplies in bf16). GEMMs and attention are separate kernels, so each "
        "is bound by its own larger time. The table: the GEMMs' (decoder linears + LM head) "
        "tensor-core time over their weight-read time at batch 64, and in brackets the batch "
        "where that ratio reaches 1 (ridge = peak FLOPs / bandwidth: "
        + ", ".join(f"{g['name']} {g['bf16_tflops'] / g['hbm_tbs']:.0f} bf16 FLOPs/byte"
                    for g in gpus)
        + "). Attention's intensity is `2·heads / (kv_heads·KV bytes)` FLOPs per byte, far "
        "below every ridge: it is memory-bound at any batch and context.",
        "",
    ]
    lines += _compute_table(data)
    lines += [
        "",
        "Where a ratio passes 1 the GEMMs are compute-bound at batch 64 and the tables' b64 "
        "figure is optimistic (the JSON's `kernel_bound_step_ms` takes each kernel's larger "
        "time). bf16 and fp8 weights give 1 and 2 FLOPs per weight byte per sequence (fp8 on "
        "a 2x peak), so their GEMMs cross near the ridge itself (hundreds of rows); int4-awq "
        "gives ~4 FLOPs per byte at the bf16 peak, so its GEMMs cross about 4x earlier: the "
        "decode batch where W4A16 stops paying for itself.",
    ]
    return "\n".join(lines)


def write_docs(section: str, path: Path = DOCS) -> None:
    """Replace what lies between the roofline markers, and nothing else."""
    text = path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: markers {BEGIN} ... {END} not found")
    path.write_text(text[:start + len(BEGIN)] + "\n" + section + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-json", type=Path, help="write every figure to this JSON file")
    ap.add_argument("--write-docs", action="store_true",
                    help=f"rewrite the roofline section of {DOCS.name}")
    args = ap.parse_args(argv)
    data = roofline()
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(data, indent=1) + "\n")
    if args.write_docs:
        write_docs(docs_section(data))
    print(stdout_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
