"""What every checkpoint reader returns: a config, canonical tensor names, and a tensor stream.

Canonical names are the Hugging Face Gemma names without the ``model.`` prefix, with one fix:
Gemma 1's ``post_attention_layernorm`` is really the norm *before* the MLP, so it is called
``pre_feedforward_layernorm`` as in Gemma 2/3. ``model.py`` then has one meaning per name:

    embed_tokens.weight                          [vocab, hidden]
    layers.{i}.input_layernorm.weight            [hidden]
    layers.{i}.self_attn.{q,k,v,o}_proj.weight   [out, in]
    layers.{i}.self_attn.{q,k}_norm.weight       [head_dim]      (Gemma 3)
    layers.{i}.post_attention_layernorm.weight   [hidden]        (Gemma 2/3)
    layers.{i}.pre_feedforward_layernorm.weight  [hidden]
    layers.{i}.post_feedforward_layernorm.weight [hidden]        (Gemma 2/3)
    layers.{i}.mlp.{gate,up,down}_proj.weight    [out, in]
    norm.weight                                  [hidden]
    lm_head.weight                               [vocab, hidden] (untied checkpoints only)

Norm weights are stored the HF way: the model multiplies by (1 + weight).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch

from trt_gemma.config import GemmaConfig
from trt_gemma.errors import CheckpointError


def expected_tensor_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor a checkpoint of this config must provide, with its shape."""
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (config.vocab_size, h),
        "norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (config.q_size, h),
            p + "self_attn.k_proj.weight": (config.kv_size, h),
            p + "self_attn.v_proj.weight": (config.kv_size, h),
            p + "self_attn.o_proj.weight": (h, config.q_size),
            p + "pre_feedforward_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
        if config.use_qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        if config.use_post_norms:
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
    return shapes


class Checkpoint(ABC):
    """A Gemma checkpoint on disk, read lazily: tensors stream one at a time."""

    def __init__(self, path: Path, config: GemmaConfig):
        self.path = path
        self.config = config

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """Canonical names of the tensors this checkpoint holds."""

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """One tensor by canonical name, in its stored (or dequantized float32) dtype."""

    @abstractmethod
    def load_tokenizer(self):
        """The checkpoint's GemmaTokenizer."""

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical name, tensor) pairs, checked against the config's expected shapes."""
        expected = expected_tensor_shapes(self.config)
        names = set(self.tensor_names())
        missing = sorted(set(expected) - names)
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(f"{self.path}: missing tensors {missing[:3]}{more}")
        for name in expected:
            tensor = self._read(name)
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"expected {expected[name]}"
                )
            yield name, tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())
