"""GemmaConfig: one frozen dataclass for every Gemma text model (Gemma 1, 2 and 3).

Model variants are data, not branches: a generation differs from another only in the values of these
fields (which layers slide, which soft-caps apply, whether QK-norm and post-norms exist), so
``model.py`` reads fields and never asks "is this Gemma 2?".

Also here: ``QuantConfig`` (what the converter did to the weights), because the engine format
and the runtime both read it and sit below the converter.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_gemma.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class GemmaConfig:
    """Shape and numerics of a Gemma text model."""

    architecture: str  # "gemma" | "gemma2" | "gemma3": informational; behaviour comes from fields
    vocab_size: int  # 256000 (Gemma 1/2) or 262144 (Gemma 3)
    hidden_size: int  # model width (640 on gemma-3-270m)
    intermediate_size: int  # GeGLU inner width
    num_hidden_layers: int
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # 1 = MQA, < heads = GQA, == heads = MHA
    head_dim: int  # 256 on most Gemmas, 128 on gemma-2-27b and gemma-3-27b
    max_position_embeddings: int  # the context length the model was trained for
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # rope base of full-attention (global) layers
    rope_local_base_freq: float = 10_000.0  # rope base of sliding-window (local) layers
    rope_scaling_factor: float = 1.0  # linear position scaling of global layers (8 on Gemma 3 4B+)
    sliding_window: int | None = None  # window W of sliding layers: position p sees p-W+1 .. p
    layer_types: tuple[str, ...] = ()  # per layer: SLIDING or FULL
    attn_logit_softcapping: float | None = None  # Gemma 2: scores s -> c*tanh(s/c), c = 50
    final_logit_softcapping: float | None = None  # Gemma 2: logits soft-capped at 30
    query_pre_attn_scalar: float | None = None  # queries scaled by this**-0.5 (None: head_dim)
    use_qk_norm: bool = False  # Gemma 3: RMSNorm on q and k per head before rope
    use_post_norms: bool = False  # Gemma 2/3: post-attention and post-feedforward norms
    tie_word_embeddings: bool = True  # the LM head is the embedding matrix
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GemmaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"GemmaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_hidden_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"GemmaConfig.layer_types has {len(self.layer_types)} entries, "
                f"expected num_hidden_layers={self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ConfigError(f"GemmaConfig.layer_types has unknown types {sorted(unknown)}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("GemmaConfig has sliding layers but no sliding_window")

    # Derived values -------------------------------------------------------------------------
    @property
    def attention_scale(self) -> float:
        """The factor applied to q·k (Gemma 2/3 use query_pre_attn_scalar, not head_dim)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_window(self, layer: int) -> int | None:
        """The window of a layer, or None for full attention."""
        return self.sliding_window if self.is_sliding(layer) else None

    def layer_rope(self, layer: int) -> tuple[float, float]:
        """(rope base, linear position scaling) of a layer: local layers never scale."""
        if self.is_sliding(layer):
            return self.rope_local_base_freq, 1.0
        return self.rope_theta, self.rope_scaling_factor

    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        norms = h * (4 if self.use_post_norms else 2)
        norms += 2 * self.head_dim if self.use_qk_norm else 0
        per_layer = attn + 3 * h * i + norms
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * per_layer + h + head

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token costs across all layers (keys and values)."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    # Serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemmaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown GemmaConfig fields {sorted(unknown)}")
        d = dict(d)
        if "layer_types" in d:
            d["layer_types"] = tuple(d["layer_types"])
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"invalid GemmaConfig: {e}") from None

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> GemmaConfig:
        """Build from a Hugging Face ``config.json`` dict (Gemma, Gemma 2, Gemma 3 text)."""
        model_type = hf.get("model_type")
        if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper: take the text part
            hf = {**hf["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        arch = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}.get(model_type)
        if arch is None:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not a Gemma text model "
                "(expected gemma, gemma2, gemma3_text or gemma3)"
            )
        try:
            n_layers = int(hf["num_hidden_layers"])
            head_dim = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
            common = dict(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=int(hf["num_attention_heads"]),
                num_key_value_heads=int(hf.get("num_key_value_heads", hf["num_attention_heads"])),
                head_dim=head_dim,
                max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                bos_token_id=_first_id(hf.get("bos_token_id"), 2),
                eos_token_id=_first_id(hf.get("eos_token_id"), 1),
                pad_token_id=_first_id(hf.get("pad_token_id"), 0),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None
        if arch == "gemma":
            return cls(**common, rope_theta=float(hf.get("rope_theta", 10_000.0)),
                       rope_local_base_freq=float(hf.get("rope_theta", 10_000.0)))
        layer_types = hf.get("layer_types")
        if not layer_types:
            # Older configs: Gemma 2 alternates local/global starting local; Gemma 3 repeats
            # `sliding_window_pattern - 1` local layers then one global.
            pattern = 2 if arch == "gemma2" else int(hf.get("sliding_window_pattern", 6))
            layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
        global_theta, local_theta, scaling = _hf_rope(hf, arch)
        return cls(
            **common,
            rope_theta=global_theta,
            rope_local_base_freq=local_theta,
            rope_scaling_factor=scaling,
            sliding_window=hf.get("sliding_window"),
            layer_types=tuple(layer_types),
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            use_qk_norm=arch == "gemma3",
            use_post_norms=True,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> GemmaConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_config(data, source=str(path))


def check_tensor_parallel_split(config: GemmaConfig, tp: int, flag: str) -> None:
    """ConfigError (naming ``flag``) when this model's heads or MLP do not split over ``tp``
    ranks Megatron-style: query heads and MLP width divide; KV heads divide, or (fewer KV heads
    than ranks) each is replicated onto the same number of ranks. Shared by the native runtime's
    shard plan and the TensorRT-LLM export."""
    if tp < 1:
        raise ConfigError(f"{flag} must be >= 1, got {tp}")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        raise ConfigError(f"{flag} {tp}: {heads} attention heads do not divide over {tp} ranks")
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ConfigError(f"{flag} {tp}: {kv} KV heads neither divide over {tp} ranks nor "
                          "replicate evenly onto them")
    if config.intermediate_size % tp:
        raise ConfigError(f"{flag} {tp}: MLP width {config.intermediate_size} does not divide "
                          f"over {tp} ranks")


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


def _hf_rope(hf: dict[str, Any], arch: str) -> tuple[float, float, float]:
    """(global base, local base, global linear scaling) from either rope config style."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:  # transformers >= 5: per layer type
        full, local = params[FULL], params.get(SLIDING, {})
        scaling = float(full.get("factor", 1.0)) if full.get("rope_type") == "linear" else 1.0
        return (float(full.get("rope_theta", 1e6)), float(local.get("rope_theta", 1e4)), scaling)
    if isinstance(params, dict) and "rope_theta" in params:  # transformers 5, one rope for all
        scaling = float(params.get("factor", 1.0)) if params.get("rope_type") == "linear" else 1.0
        theta = float(params["rope_theta"])
        return theta, theta if arch == "gemma2" else 1e4, scaling
    theta = float(hf.get("rope_theta", 10_000.0))
    rs = hf.get("rope_scaling") or {}
    linear = rs.get("rope_type", rs.get("type")) == "linear"
    scaling = float(rs.get("factor", 1.0)) if linear else 1.0
    local = theta if arch == "gemma2" else float(hf.get("rope_local_base_freq", 10_000.0))
    return theta, local, scaling


def _gemma3_layers(n: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n))


def _gemma2_layers(n: int) -> tuple[str, ...]:
    return tuple(FULL if i % 2 else SLIDING for i in range(n))


def _gemma1(**kw: Any) -> GemmaConfig:
    return GemmaConfig(architecture="gemma", vocab_size=256000, head_dim=256,
                       max_position_embeddings=8192, **kw)


def _gemma2(**kw: Any) -> GemmaConfig:
    return GemmaConfig(
        architecture="gemma2", vocab_size=256000, max_position_embeddings=8192,
        sliding_window=4096, layer_types=_gemma2_layers(kw["num_hidden_layers"]),
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, use_post_norms=True, **kw,
    )


def _gemma3(window: int = 1024, scaling: float = 8.0, context: int = 131072,
            **kw: Any) -> GemmaConfig:
    return GemmaConfig(
        architecture="gemma3", vocab_size=262144, max_position_embeddings=context,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling_factor=scaling,
        sliding_window=window, layer_types=_gemma3_layers(kw["num_hidden_layers"]),
        use_qk_norm=True, use_post_norms=True, **kw,
    )


# Real shapes of the released models, for random-weight benchmarks (numbers from their configs).
PRESETS: dict[str, GemmaConfig] = {
    "gemma-2b": _gemma1(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                        num_attention_heads=8, num_key_value_heads=1),
    "gemma-7b": _gemma1(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=16),
    "gemma-2-2b": _gemma2(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                          query_pre_attn_scalar=256),
    "gemma-2-9b": _gemma2(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                          query_pre_attn_scalar=256),
    "gemma-2-27b": _gemma2(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                           num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                           query_pre_attn_scalar=144),
    "gemma-3-270m": _gemma3(window=512, scaling=1.0, context=32768, hidden_size=640,
                            intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256),
    "gemma-3-1b": _gemma3(window=512, scaling=1.0, context=32768, hidden_size=1152,
                          intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256),
    "gemma-3-4b": _gemma3(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                          query_pre_attn_scalar=256),
    "gemma-3-12b": _gemma3(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                           query_pre_attn_scalar=256),
    "gemma-3-27b": _gemma3(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                           num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                           query_pre_attn_scalar=168),
}


def preset(name: str) -> GemmaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


QUANT_MODES = ("none", "fp8", "int4-awq", "int4")
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class QuantConfig:
    """What the converter did to the weights; stored in engine.json, read by the runtime."""

    mode: str = "none"  # one of QUANT_MODES
    group_size: int = 128  # int4 modes: input channels sharing one scale
    kv_cache_dtype: str = "auto"  # "auto" = activation dtype; "fp8" = e4m3 with per-layer scales
    quantize_lm_head: bool = False  # the (tied) LM head / embedding stays unquantized by default
    extra: dict[str, Any] = field(default_factory=dict)  # mode-specific facts (calibration size...)

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise ConfigError(f"unknown quant mode {self.mode!r}; expected one of {QUANT_MODES}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; expected one of {KV_CACHE_DTYPES}"
            )
        if self.group_size < 32 or not math.log2(self.group_size).is_integer():
            raise ConfigError(f"group_size must be a power of two >= 32, got {self.group_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        return cls(**d)
