"""Sampler: every sampling option on batched logits, seeds independent of the batch (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from trt_gemma.runtime.sampler import Sampler
from trt_gemma.runtime.sequence import Sequence
from trt_gemma.sampling_params import SamplingParams

V = 50
EOS = 1


def _seq(params, prompt=(3, 4, 5), output=(), seed_index=0):
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed + seed_index)
    seq = Sequence(0, "r", 0, list(prompt), params, 0, 1, gen)
    seq.token_ids += list(output)
    return seq


def _logits(rows, seed=0):
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.fixture
def sampler():
    return Sampler(frozenset({EOS}), torch.device("cpu"), seed=0)


def test_greedy_is_argmax(sampler):
    logits = _logits(4)
    out = sampler(logits.clone(), [_seq(SamplingParams(temperature=0.0))] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


def test_top_k_one_is_greedy_at_any_temperature(sampler):
    logits = _logits(3)
    seqs = [_seq(SamplingParams(temperature=5.0, top_k=1)) for _ in range(3)]
    assert sampler(logits.clone(), seqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_and_top_p_and_min_p_restrict_the_support(sampler):
    logits = (_logits(1) / 3).repeat(64, 1)  # flat enough that each filter keeps several
    order = logits[0].argsort(descending=True).tolist()
    probs = torch.softmax(logits[0], -1)
    cases = {
        "top_k": (SamplingParams(temperature=1.0, top_k=3), set(order[:3])),
        "top_p": (SamplingParams(temperature=1.0, top_p=0.5),
                  set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1])),
        "min_p": (SamplingParams(temperature=1.0, min_p=0.2),
                  {t for t in range(V) if probs[t] >= 0.2 * probs.max()}),
    }
    for name, (params, allowed) in cases.items():
        tokens = sampler(logits.clone(), [_seq(params) for _ in range(64)]).token_ids
        assert set(tokens) <= allowed, name
        assert len(set(tokens)) > 1 or len(allowed) == 1, name


def test_sampling_follows_the_distribution(sampler):
    logits = torch.tensor([[2.0, 1.0, 0.0] + [-30.0] * (V - 3)]).repeat(4000, 1)
    tokens = torch.tensor(sampler(logits, [_seq(SamplingParams(temperature=1.0))] * 4000)
                          .token_ids)
    freq = torch.bincount(tokens, minlength=3)[:3].float() / 4000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), -1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_seeded_rows_do_not_depend_on_the_batch(sampler):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1234)
    logits = _logits(1, seed=7)
    alone = sampler(logits.clone(), [_seq(params)]).token_ids[0]
    seq = _seq(params)
    tokens_alone = [sampler(logits.clone(), [seq]).token_ids[0] for _ in range(8)]
    seq = _seq(params)
    tokens_batched = []
    for step in range(8):
        others = _logits(5, seed=100 + step)
        batch = torch.cat([others[:2], logits, others[2:]])
        seqs = [_seq(SamplingParams(temperature=1.0)), _seq(SamplingParams(temperature=0.0)),
                seq, _seq(SamplingParams(temperature=1.0, seed=5)),
                _seq(SamplingParams(temperature=1.0, top_k=3)),
                _seq(SamplingParams(temperature=1.0, top_p=0.3))]
        tokens_batched.append(sampler(batch, seqs).token_ids[2])
    assert tokens_batched == tokens_alone and tokens_alone[0] == alone
    assert len(set(tokens_alone)) > 1  # the generator advances: not one token repeated


def test_repetition_presence_frequency_penalties(sampler):
    row = torch.zeros(1, V)
    row[0, 10], row[0, 11], row[0, 12] = 2.0, -2.0, 1.0
    seq = _seq(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=(10,), output=(11,))
    sampler(row, [seq])
    assert row[0, 10] == 1.0 and row[0, 11] == -4.0 and row[0, 12] == 1.0
    row = torch.zeros(1, V)
    seq = _seq(SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25),
               prompt=(20,), output=(21, 21, 22))
    sampler(row, [seq])
    assert row[0, 20] == 0.0  # the prompt is not penalised by presence/frequency
    assert row[0, 21] == pytest.approx(-0.5 - 0.5) and row[0, 22] == pytest.approx(-0.75)


def test_min_tokens_masks_stop_tokens(sampler):
    logits = torch.zeros(2, V)
    logits[:, EOS] = 10.0
    logits[:, 7] = 9.0
    seqs = [_seq(SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(7,))),
            _seq(SamplingParams(temperature=0.0, min_tokens=2), output=(3, 3))]
    assert sampler(logits, seqs).token_ids[0] not in (EOS, 7)
    assert sampler(torch.zeros(1, V).index_fill_(1, torch.tensor([EOS]), 10.0),
                   seqs[1:]).token_ids == [EOS]  # min_tokens reached: eos allowed again


def test_ignore_eos_does_not_mask_user_stop_ids(sampler):
    params = SamplingParams(ignore_eos=True, stop_token_ids=(9,))
    assert sampler.stop_token_ids(_seq(params)) == {9}
    assert sampler.stop_token_ids(_seq(SamplingParams())) == {EOS}


def test_logprobs_of_sampled_token_and_top_n(sampler):
    logits = _logits(2)
    seqs = [_seq(SamplingParams(temperature=0.0, logprobs=3)),
            _seq(SamplingParams(temperature=2.0, logprobs=0, seed=3))]
    out = sampler(logits.clone(), seqs)
    lp0, rank0, top0 = out.logprobs[0]
    ref = torch.log_softmax(logits[0], -1)
    assert rank0 == 1 and lp0 == pytest.approx(ref.max().item(), abs=1e-5)
    assert [t for t, _ in top0] == ref.topk(3).indices.tolist()
    lp1, rank1, top1 = out.logprobs[1]
    ref1 = torch.log_softmax(logits[1], -1)  # raw: before temperature
    assert lp1 == pytest.approx(ref1[out.token_ids[1]].item(), abs=1e-5)
    assert rank1 == int((ref1 > ref1[out.token_ids[1]]).sum()) + 1 and top1 == []
    assert math.isfinite(lp1)


def test_logprobs_raw_by_default_processed_after_penalties_and_temperature():
    logits = _logits(2)
    params = [SamplingParams(temperature=2.0, logprobs=2, seed=3),
              SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5)]
    raw = Sampler(frozenset({EOS}), torch.device("cpu"))
    processed = Sampler(frozenset({EOS}), torch.device("cpu"), logprobs_mode="processed_logprobs")
    out_raw = raw(logits.clone(), [_seq(p) for p in params])
    out_proc = processed(logits.clone(), [_seq(p) for p in params])
    assert out_raw.token_ids == out_proc.token_ids
    penalised = logits[1].clone()
    seen = torch.tensor([3, 4, 5])  # the prompt
    penalised[seen] = torch.where(penalised[seen] > 0, penalised[seen] / 1.5,
                                  penalised[seen] * 1.5)
    refs_raw = [torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1)]
    refs_proc = [torch.log_softmax(logits[0] / 2.0, -1), torch.log_softmax(penalised, -1)]
    for out, refs in ((out_raw, refs_raw), (out_proc, refs_proc)):
        for i, ref in enumerate(refs):
            lp, rank, top = out.logprobs[i]
            token = out.token_ids[i]
            assert lp == pytest.approx(ref[token].item(), abs=1e-5)
            assert rank == int((ref > ref[token]).sum()) + 1
            assert [t for t, _ in top] == ref.topk(2).indices.tolist()


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("max_tokens", 0), ("n", 0),
    ("logprobs", 21),
])
def test_invalid_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
