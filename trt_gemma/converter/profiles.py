"""Build profiles: per target GPU, the quant mode, KV-cache dtype and batch/sequence/token limits.

A profile is data (``GpuTarget``); ``resolve_profile`` turns a target and a model config into
concrete ``BuildLimits`` from memory arithmetic, so one recipe serves every Gemma size:

    weights  = sum over linears of their quantized bytes + embedding/norms in bf16
    kv/token = 2 (k, v) * num_kv_heads * head_dim * bytes(kv dtype) per layer; a sliding-window
               layer stores at most ``window`` tokens of a sequence
    budget   = memory * memory_fraction - weights - workspace (activations, logits)
    batch    = budget // kv bytes of one sequence at max_seq_len, capped by the profile

The quant mode is the first of the target's preferences whose weights take at most
``weight_fraction`` of memory (a 27B model in FP8 does not fit a 24 GB card; INT4-AWQ does). FP8
(weights or KV cache) is only chosen on compute capability 8.9+ (Ada, Hopper): older GPUs have no
FP8 tensor cores, and Triton cannot convert e4m3 there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from trt_gemma.config import GemmaConfig
from trt_gemma.errors import ConfigError

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class GpuTarget:
    """One GPU model and the serving limits we aim for on it."""

    name: str  # profile name on the command line
    gpu: str  # marketing name
    memory_mib: int  # total memory as nvidia-smi reports it (approximate)
    compute_capability: tuple[int, int]
    quant_preference: tuple[str, ...]  # first mode whose weights fit weight_fraction wins
    kv_cache_dtype: str  # "fp8" or "auto" (the activation dtype)
    max_batch_size: int  # cap on concurrent sequences
    max_seq_len: int  # cap on prompt + output tokens (the model's context caps it too)
    max_num_tokens: int  # tokens per engine step (prefill chunk + decodes)
    memory_fraction: float = 0.90  # share of memory the engine may use (the rest: CUDA context...)
    weight_fraction: float = 0.60  # weights may take at most this share, leaving room for KV

    @property
    def supports_fp8(self) -> bool:
        return self.compute_capability >= (8, 9)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


PROFILES: dict[str, GpuTarget] = {p.name: p for p in (
    # Ada consumer card: FP8 fits every Gemma up to 12B; 27B falls back to INT4-AWQ.
    GpuTarget("rtx4090", "GeForce RTX 4090 24 GB", 24564, (8, 9), ("fp8", "int4-awq"), "fp8",
              max_batch_size=64, max_seq_len=8192, max_num_tokens=4096),
    # L4: 300 GB/s memory is its bottleneck, so INT4 (half FP8's bytes per decode step) first.
    GpuTarget("l4", "L4 24 GB", 23034, (8, 9), ("int4-awq",), "fp8",
              max_batch_size=64, max_seq_len=8192, max_num_tokens=4096),
    GpuTarget("l40s", "L40S 48 GB", 46068, (8, 9), ("fp8", "int4-awq"), "fp8",
              max_batch_size=128, max_seq_len=16384, max_num_tokens=8192),
    # Ampere: no FP8. bf16 when it fits, else INT4-AWQ (W4A16 runs on sm_80).
    GpuTarget("a100-80gb", "A100 80 GB", 81920, (8, 0), ("none", "int4-awq"), "auto",
              max_batch_size=256, max_seq_len=32768, max_num_tokens=8192),
    GpuTarget("h100-80gb", "H100 80 GB (SXM/PCIe)", 81559, (9, 0), ("fp8", "int4-awq"), "fp8",
              max_batch_size=256, max_seq_len=32768, max_num_tokens=16384),
    GpuTarget("h200", "H200 141 GB", 143771, (9, 0), ("fp8", "int4-awq"), "fp8",
              max_batch_size=512, max_seq_len=131072, max_num_tokens=16384),
)}


def get_profile(name: str) -> GpuTarget:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown build profile {name!r}; known: {', '.join(PROFILES)}") from None


# Memory arithmetic ---------------------------------------------------------------------------


def _linear_shapes(config: GemmaConfig) -> list[tuple[int, int]]:
    h, i = config.hidden_size, config.intermediate_size
    per_layer = [(config.q_size, h), (config.kv_size, h), (config.kv_size, h),
                 (h, config.q_size), (i, h), (i, h), (h, i)]
    return per_layer * config.num_hidden_layers


def weight_bytes(config: GemmaConfig, mode: str, group_size: int = 128, dtype_bytes: int = 2,
                 quantize_lm_head: bool = False) -> int:
    """Bytes of an engine's weights: quantized linears + dense embedding, norms (and head)."""

    def linear(out: int, inp: int) -> int:
        if mode == "none":
            return out * inp * dtype_bytes
        if mode == "fp8":
            return out * inp + out * 4 + 4  # e4m3 codes, fp32 per-channel scale, input scale
        groups = -(-inp // group_size)
        pqs = inp * dtype_bytes if mode == "int4-awq" else 0
        return out * inp // 2 + out * groups * (dtype_bytes + 1) + pqs  # codes, scales, zeros

    total = sum(linear(o, i) for o, i in _linear_shapes(config))
    embed = config.vocab_size * config.hidden_size
    total += embed * dtype_bytes
    if quantize_lm_head and mode != "none":
        total += linear(config.vocab_size, config.hidden_size)
    elif not config.tie_word_embeddings:
        total += embed * dtype_bytes
    norms = config.num_parameters() - embed * (1 if config.tie_word_embeddings else 2)
    norms -= sum(o * i for o, i in _linear_shapes(config))
    return total + norms * dtype_bytes


def kv_bytes_per_sequence(config: GemmaConfig, seq_len: int, kv_bytes: int) -> int:
    """KV-cache bytes of one sequence of seq_len tokens (window layers keep at most W tokens)."""
    per_token_layer = 2 * config.kv_size * kv_bytes
    return sum(per_token_layer * min(seq_len, config.layer_window(i) or seq_len)
               for i in range(config.num_hidden_layers))


def workspace_bytes(config: GemmaConfig, max_num_tokens: int, max_batch_size: int,
                    dtype_bytes: int = 2) -> int:
    """Activations of one step ([tokens, width] buffers) + fp32 logits of the batch + 1 GiB."""
    width = config.hidden_size * 4 + config.intermediate_size * 2 + config.q_size
    return max_num_tokens * width * dtype_bytes + max_batch_size * config.vocab_size * 4 + GIB


@dataclass(frozen=True)
class BuildLimits:
    """A profile resolved for one model: what the engine is built for."""

    profile: str
    gpu: str
    quant: str
    kv_cache_dtype: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    weight_bytes: int
    kv_bytes_per_token: int  # all layers, ignoring windows (the worst case of a short sequence)
    kv_budget_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_quant(target: GpuTarget, config: GemmaConfig, group_size: int = 128) -> str:
    """The first preferred mode within ``weight_fraction``, else the last (smallest) one."""
    limit = target.memory_bytes * target.weight_fraction
    usable = [m for m in target.quant_preference if m != "fp8" or target.supports_fp8]
    for mode in usable:
        if weight_bytes(config, mode, group_size) <= limit:
            return mode
    return usable[-1]  # resolve_profile checks that the KV cache still has room


def resolve_profile(target: GpuTarget, config: GemmaConfig, *, quant: str | None = None,
                    kv_cache_dtype: str | None = None, group_size: int = 128,
                    quantize_lm_head: bool = False) -> BuildLimits:
    """Limits for ``config`` on ``target``; ``quant``/``kv_cache_dtype`` override the profile's."""
    quant = quant or choose_quant(target, config, group_size)
    kv = kv_cache_dtype or target.kv_cache_dtype
    if not target.supports_fp8 and (quant == "fp8" or kv == "fp8"):
        cc = ".".join(map(str, target.compute_capability))
        raise ConfigError(f"profile {target.name}: FP8 needs compute capability 8.9+ and the "
                          f"{target.gpu} is {cc}; use --quant int4-awq/none and "
                          "--kv-cache-dtype auto")
    weights = weight_bytes(config, quant, group_size, quantize_lm_head=quantize_lm_head)
    kv_bytes = 1 if kv == "fp8" else 2
    seq_len = min(target.max_seq_len, config.max_position_embeddings)
    workspace = workspace_bytes(config, target.max_num_tokens, target.max_batch_size)
    budget = int(target.memory_bytes * target.memory_fraction) - weights - workspace
    per_seq = kv_bytes_per_sequence(config, seq_len, kv_bytes)
    if budget < per_seq:
        raise ConfigError(
            f"profile {target.name}: {quant} weights ({weights / GIB:.1f} GiB) leave "
            f"{max(budget, 0) / GIB:.1f} GiB for the KV cache, less than one {seq_len}-token "
            f"sequence needs ({per_seq / GIB:.2f} GiB)"
        )
    batch = min(target.max_batch_size, budget // per_seq)
    return BuildLimits(
        profile=target.name, gpu=target.gpu, quant=quant, kv_cache_dtype=kv,
        max_batch_size=int(batch), max_input_len=min(seq_len - 1, target.max_num_tokens),
        max_seq_len=seq_len, max_num_tokens=target.max_num_tokens, weight_bytes=weights,
        kv_bytes_per_token=config.kv_bytes_per_token(kv_bytes), kv_budget_bytes=budget,
    )
