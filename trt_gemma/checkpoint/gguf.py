"""GGUF files (llama.cpp's format): metadata → GemmaConfig, tensors dequantized to float32.

llama.cpp's converter stores Gemma's RMSNorm weights as (1 + w); we subtract the 1 again so a GGUF
and an HF checkpoint give the same canonical tensors. Gemma uses NEOX-style rope in llama.cpp, so
q/k weights are stored unpermuted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trt_gemma.checkpoint.base import Checkpoint
from trt_gemma.gguf_file import GGUFFile, GGUFFormatError, read_gguf
from trt_gemma.config import FULL, SLIDING, GemmaConfig
from trt_gemma.errors import CheckpointError

_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}


def canonical_gguf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def _metadata_wanted(key: str) -> bool:
    """Skip the big vocabulary arrays: the tokenizer reads those itself."""
    return not key.startswith("tokenizer.") or key.endswith("_id")


def open_gguf(path: Path) -> GGUFFile:
    try:
        return read_gguf(path, keep=_metadata_wanted)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except GGUFFormatError as e:
        raise CheckpointError(str(e)) from None


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        self._file = open_gguf(path)
        super().__init__(path, gguf_config(self._file, path))
        self._tensors = {}
        for info in self._file.tensors.values():
            name = canonical_gguf_name(info.name)
            if name is not None:
                self._tensors[name] = info

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def _read(self, name: str) -> torch.Tensor:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self._tensors[name]
        qtype = GGMLQuantizationType(info.ggml_type)
        try:
            data = dequantize(self._file.tensor_bytes(info), qtype)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {info.name} uses GGUF type {qtype.name}, "
                "which cannot be dequantized"
            ) from None
        # GGUF lists dims fastest-first; numpy holds them slowest-first, i.e. [out, in].
        shape = tuple(reversed(info.shape))
        tensor = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))
        if name.endswith("norm.weight"):
            tensor = tensor - 1.0
        return tensor

    def load_tokenizer(self):
        from trt_gemma.tokenizer import GemmaTokenizer

        return GemmaTokenizer.from_gguf(self.path)


def gguf_config(file: GGUFFile, path: Path) -> GemmaConfig:
    fields = file.fields
    arch_name = fields.get("general.architecture")
    arch = _ARCHITECTURES.get(arch_name)
    if arch is None:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch_name!r} is not a Gemma text model "
            f"(expected one of {sorted(_ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch_name}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata {arch_name}.{key} is missing")
        return value

    embed = file.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing")
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    has_output = "output.weight" in file.tensors
    common = dict(
        architecture=arch,
        vocab_size=int(embed.shape[-1]),  # GGUF shape is [hidden, vocab], fastest dim first
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings=not has_output,
        bos_token_id=int(fields.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(fields.get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(fields.get("tokenizer.ggml.padding_token_id", 0)),
    )
    theta = float(get("rope.freq_base", 10_000.0))
    if arch == "gemma":
        return GemmaConfig(**common, rope_theta=theta, rope_local_base_freq=theta)
    # GGUF has no query_pre_attn_scalar: like llama.cpp, the 27B models scale by hidden/heads,
    # all others by head_dim.
    is_27b = layers in (46, 62)
    scalar = hidden // heads if is_27b else head_dim
    if arch == "gemma2":
        layer_types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))
        return GemmaConfig(
            **common, rope_theta=theta, rope_local_base_freq=theta,
            sliding_window=int(get("attention.sliding_window", 4096)), layer_types=layer_types,
            attn_logit_softcapping=float(get("attn_logit_softcapping", 50.0)),
            final_logit_softcapping=float(get("final_logit_softcapping", 30.0)),
            query_pre_attn_scalar=scalar, use_post_norms=True,
        )
    # Gemma 3: five local layers (rope base 10k) then one global; llama.cpp hard-codes both.
    scaling = 1.0
    if fields.get(f"{arch_name}.rope.scaling.type") == "linear":
        scaling = float(get("rope.scaling.factor", 1.0))
    layer_types = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers))
    return GemmaConfig(
        **common, rope_theta=theta, rope_local_base_freq=10_000.0, rope_scaling_factor=scaling,
        sliding_window=int(get("attention.sliding_window", 1024)), layer_types=layer_types,
        query_pre_attn_scalar=scalar, use_qk_norm=True, use_post_norms=True,
    )
