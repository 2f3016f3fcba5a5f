"""CPU bf16 linears packed into oneDNN's layout: same bits as F.linear, same model outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import save_tiny_checkpoint

from trt_gemma import packed_linear
from trt_gemma.checkpoint import open_checkpoint
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.model import GemmaModel

pytestmark = pytest.mark.skipif(not packed_linear.available(),
                                reason="no oneDNN bf16 inner product on this CPU")


@pytest.mark.parametrize("rows", [1, 3, 32, 77, 300])
def test_packed_linear_equals_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(640, 384, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(rows, 384, generator=g).to(torch.bfloat16)
    packed = packed_linear.pack(w)
    assert isinstance(packed, packed_linear.PackedLinearWeight)
    assert torch.equal(packed.linear(x), F.linear(x, w))
    assert torch.equal(packed.linear(x[:, :].T.contiguous().T), F.linear(x, w))  # strided input
    assert packed.linear(x[:0]).shape == (0, 640)
    assert torch.equal(packed.dense(), w)


def test_only_dense_bf16_cpu_matrices_are_packed():
    for w in (torch.randn(8, 8), torch.randn(8, 8).half(), torch.randn(8).bfloat16(), (1, 2)):
        assert packed_linear.pack(w) is w


def test_model_outputs_are_unchanged_by_packing(tmp_path):
    save_tiny_checkpoint("gemma3-gqa", tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    models = [GemmaModel.from_state_dict(checkpoint.config, checkpoint.state_dict(),
                                         dtype=torch.bfloat16, pack_cpu_linears=pack)
              for pack in (True, False)]
    assert isinstance(models[0].layers[0].down, packed_linear.PackedLinearWeight)
    assert isinstance(models[1].layers[0].down, torch.Tensor)
    ids = torch.randint(3, 512, (19,), generator=torch.Generator().manual_seed(3))
    outs = []
    for model in models:
        cache = ContiguousKVCache(model.config, 64, model.dtype)
        outs.append(torch.cat([model.compute_logits(cache.forward(model, part))
                               for part in (ids[:11], ids[11:12], ids[12:])]))
    assert torch.equal(outs[0], outs[1])
