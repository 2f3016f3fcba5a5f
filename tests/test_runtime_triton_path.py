"""The runtime on the CUDA code path (Triton kernels interpreted on CPU) against the reference path.

Continuous batching mixes decodes and prefill chunks in one step, reuses cached prefixes and reads
sliding-window caches: every kernel of the decode step (fused q/k norm + rope + KV write, paged
decode with static splits, varlen prefill, add + norm, GeGLU) runs under those schedules here.
"""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import drain, greedy, make_engine, random_prompts, tiny_models

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interprets the CUDA path")


def _run(model, prompts, monkeypatch, triton: bool, **config):
    monkeypatch.setenv("TRT_GEMMA_TRITON_ON_CPU", "1" if triton else "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    engine = make_engine(model, greedy_head_max_rows=0, **config)
    # later requests arrive while earlier ones decode: mixed decode + prefill steps
    schedule = {i: [(str(i), p, greedy(6, logprobs=1))] for i, p in enumerate(prompts)}
    return drain(engine, schedule)


@pytest.mark.parametrize("variant", [
    "gemma3-gqa",
    # ~25 s each interpreted; the whole-model Triton parity tests cover these generations too
    pytest.param("gemma2-softcap-small", marks=pytest.mark.slow),
    pytest.param("gemma1-mqa", marks=pytest.mark.slow),
])
def test_triton_path_generates_what_the_reference_path_does(tmp_path, monkeypatch, variant):
    pytest.importorskip("triton")
    _, model = tiny_models(tmp_path, variant)
    base = random_prompts([11], seed=5)[0]
    # a shared prefix (prefix-cache hit), prompts longer than the sliding windows, chunked prefill
    prompts = [base, base[:9] + [7, 8, 9], *random_prompts([3, 14], seed=6)]
    config = dict(max_num_batched_tokens=8, max_num_seqs=4, block_size=4)
    want = _run(model, prompts, monkeypatch, triton=False, **config)
    got = _run(model, prompts, monkeypatch, triton=True, **config)
    for rid, ref in want.items():
        ours = got[rid].outputs[0]
        assert ours.token_ids == ref.outputs[0].token_ids, rid
        for a, b in zip(ours.logprobs, ref.outputs[0].logprobs, strict=True):
            (ta, la), = ((t, p.logprob) for t, p in a.items() if t in b)
            assert la == pytest.approx(b[ta].logprob, abs=1e-4)


def test_bf16_triton_path_stays_close_to_fp32(tmp_path, monkeypatch):
    """bf16 runs on CPU through the Triton path (KV cache in bf16, as on a GPU)."""
    pytest.importorskip("triton")
    _, model = tiny_models(tmp_path, "gemma3-gqa")
    prompts = random_prompts([9, 5], seed=7)
    want = _run(model, prompts, monkeypatch, triton=False)
    bf16 = type(model)(model.config, model.embed.bfloat16(),
                       [type(w)(**{k: (t.bfloat16() if isinstance(t, torch.Tensor) else t)
                                   for k, t in vars(w).items()}) for w in model.layers],
                       model.final_norm.bfloat16(), model.lm_head.bfloat16())
    engine_out = _run(bf16, prompts, monkeypatch, triton=True)
    assert bf16.dtype == torch.bfloat16
    for rid, ref in want.items():
        first = engine_out[rid].outputs[0].logprobs[0]
        ref_first = ref.outputs[0].logprobs[0]
        (t_ref, lp_ref), = ref_first.items()
        # the fp32 model's first greedy token is (near-)top in bf16 as well
        assert engine_out[rid].outputs[0].token_ids[0] == t_ref or (
            abs(next(iter(first.values())).logprob - lp_ref.logprob) < 0.05)
