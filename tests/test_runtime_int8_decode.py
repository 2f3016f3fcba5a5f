"""Small CPU steps on the INT8 (W8A16) twin of a bf16 model: the kernel against its dequantized
weight, the twin against the model, and the engine's small steps against the twin run alone."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import save_tiny_checkpoint
from runtime_helpers import (
    drain,
    greedy,
    make_engine,
    random_prompts,
    tiny_models,
)

from trt_gemma.checkpoint import open_checkpoint
from trt_gemma.errors import ConfigError
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.model import GemmaModel
from trt_gemma.runtime import EngineConfig
from trt_gemma.runtime.int8_decode import Int8RowWeight, available, int8_twin

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("g3")
    save_tiny_checkpoint("gemma3-gqa", directory)
    checkpoint = open_checkpoint(directory)
    return GemmaModel.from_state_dict(checkpoint.config, checkpoint.state_dict(),
                                      dtype=torch.bfloat16)


def test_kernel_matches_the_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 64, generator=g) * 0.05).bfloat16()
    weight = Int8RowWeight.from_dense(w)
    assert weight.q.dtype == torch.int8 and int(weight.q.abs().max()) <= 127
    # Per-channel INT8: every weight within half a step of the original.
    step = weight.scale.float()[:, None]
    assert ((weight.dequantize() - w.float()).abs() <= step / 2 + 1e-6).all()
    x = (torch.randn(2, 3, 64, generator=g)).bfloat16()
    out = weight.linear(x)
    assert out.shape == (2, 3, 96) and out.dtype == torch.bfloat16
    exact = x.double() @ weight.dequantize(torch.float64).T
    assert torch.allclose(out.double(), exact, rtol=2**-7, atol=1e-3)


def test_twin_shares_everything_but_the_linear_weights(bf16_model):
    assert available(bf16_model)
    twin = int8_twin(bf16_model)
    assert int8_twin(bf16_model) is twin  # built once per model
    assert twin.embed is bf16_model.embed and twin.lm_head is bf16_model.lm_head
    for a, b in zip(twin.layers, bf16_model.layers, strict=True):
        assert a.input_norm is b.input_norm and isinstance(a.gate_up, Int8RowWeight)
    # Its logits stay close to the model's (W8A16 error only).
    ids = torch.tensor(random_prompts([12])[0])
    logits = [m.compute_logits(ContiguousKVCache(m.config, 12, m.dtype, m.device).forward(m, ids))
              for m in (bf16_model, twin)]
    rel = (logits[0] - logits[1]).norm() / logits[0].norm()
    assert 0 < rel < 0.05


def test_engine_small_steps_run_the_twin(bf16_model):
    twin = int8_twin(bf16_model)
    prompt = random_prompts([3], seed=5)[0]

    def alone(model, n=12):  # greedy decoding with a contiguous cache, one token per forward
        cache = ContiguousKVCache(model.config, len(prompt) + n, model.dtype, model.device)
        ids, out = list(prompt), []
        hidden = cache.forward(model, torch.tensor(ids))
        for _ in range(n):
            out.append(int(model.compute_logits(hidden[-1:]).argmax()))
            hidden = cache.forward(model, torch.tensor(out[-1:]))
        return out

    # Every step is <= 4 tokens (prompt of 3, then single-token decodes): all on the twin.
    on = drain(make_engine(bf16_model, cpu_int8_decode_max_rows=4, greedy_head_max_rows=0),
               {0: [("a", prompt, greedy(12))]})
    assert on["a"].outputs[0].token_ids == alone(twin)
    off = drain(make_engine(bf16_model, greedy_head_max_rows=0), {0: [("a", prompt, greedy(12))]})
    assert off["a"].outputs[0].token_ids == alone(bf16_model)


def test_fp32_models_never_use_it(tmp_path):
    _, model = tiny_models(tmp_path, "gemma2-gqa")
    assert not available(model)
    engine = make_engine(model, cpu_int8_decode_max_rows=8)
    assert engine.runner.small_model is None


def test_negative_rows_rejected():
    with pytest.raises(ConfigError, match="cpu_int8_decode_max_rows"):
        EngineConfig(cpu_int8_decode_max_rows=-1)
