"""Tiny random Gemma 1/2/3 checkpoints built with transformers' own config classes.

Used by parity tests: transformers is the independent reference for the model math.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
    bos_token_id=2, eos_token_id=1, pad_token_id=0,
)

# name -> (config class name, model class name, extra config kwargs)
TINY_VARIANTS = {
    "gemma1-mqa": ("GemmaConfig", "GemmaForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=1)),
    "gemma1-mha": ("GemmaConfig", "GemmaForCausalLM",
                   dict(num_attention_heads=2, num_key_value_heads=2)),
    "gemma2-gqa": ("Gemma2Config", "Gemma2ForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        query_pre_attn_scalar=24)),
    "gemma2-softcap-small": ("Gemma2Config", "Gemma2ForCausalLM",
                             # tiny caps make the tanh actually bite on random weights
                             dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=3,
                                  attn_logit_softcapping=0.5, final_logit_softcapping=0.3,
                                  query_pre_attn_scalar=32)),
    "gemma3-gqa": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                        query_pre_attn_scalar=32, num_hidden_layers=6,
                        layer_types=["sliding_attention"] * 2 + ["full_attention"]
                        + ["sliding_attention"] * 2 + ["full_attention"])),
    "gemma3-scaled-rope": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                           dict(num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
                                query_pre_attn_scalar=20,
                                rope_parameters={
                                    "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                       "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 10_000.0}})),
}


def make_tiny_hf_model(variant: str, seed: int = 0, vocab_size: int | None = None):
    """A transformers model with random weights (norm weights randomised too, so (1+w) matters)."""
    import transformers

    cfg_name, model_name, extra = TINY_VARIANTS[variant]
    kwargs = {**TINY_COMMON, **extra}
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    config = getattr(transformers, cfg_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def save_tiny_checkpoint(variant: str, directory: Path, dtype=torch.float32, seed: int = 0,
                         vocab_size: int | None = None):
    model = make_tiny_hf_model(variant, seed, vocab_size)
    model.to(dtype).save_pretrained(directory, safe_serialization=True)
    return model


def save_tiny_with_tokenizer(variant: str, directory: Path, vocab_size: int):
    """An fp32 tiny checkpoint of ``vocab_size`` tokens with a character tokenizer that fits it
    (a source every command can load); returns the transformers model."""
    from conftest import save_char_tokenizer

    model = save_tiny_checkpoint(variant, Path(directory), vocab_size=vocab_size)
    save_char_tokenizer(Path(directory), vocab_size)
    return model
