"""Speculative decoding on tiny random Gemma 1/2/3 models: greedy outputs identical with and
without it (n-gram and draft proposers; batches, chunked prefill, preemption, stop tokens and
strings, min_tokens, max_tokens, logprobs), block accounting after rollbacks, prefix hashes over
verified tokens only, the n-gram proposal rule against a brute-force reference, and rejection
sampling against the exact target distribution (chi-square)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from runtime_helpers import CharTokenizer, drain, greedy, random_prompts, tiny_models

from trt_gemma.errors import ConfigError
from trt_gemma.runtime import EngineConfig, LLMEngine
from trt_gemma.runtime.sequence import Sequence
from trt_gemma.runtime.speculative import Speculator, propose_ngram, verify
from trt_gemma.runtime.sampler import Sampler
from trt_gemma.sampling_params import SamplingParams

VARIANTS = ["gemma1-mqa", "gemma2-gqa", "gemma3-gqa"]
NGRAM = dict(speculative_method="ngram", num_speculative_tokens=4, ngram_min=1, ngram_max=3,
             speculative_disable_by_batch_size=0)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(variant, seed=0):
        if (variant, seed) not in cache:
            directory = tmp_path_factory.mktemp(f"{variant}-{seed}")
            from hf_tiny import save_tiny_checkpoint

            from trt_gemma.checkpoint import open_checkpoint
            from trt_gemma.model import GemmaModel

            if seed == 0:
                cache[(variant, seed)] = tiny_models(directory, variant)
            else:
                hf = save_tiny_checkpoint(variant, directory, seed=seed)
                ckpt = open_checkpoint(directory)
                cache[(variant, seed)] = hf, GemmaModel.from_state_dict(ckpt.config,
                                                                        ckpt.state_dict())
        return cache[(variant, seed)]

    return get


def engine(model, tokenizer=None, draft=None, **config):
    config.setdefault("kv_cache_memory", 8 << 20)
    return LLMEngine(model, tokenizer, EngineConfig(**config), draft=draft)


def repetitive_prompts(seed=0):
    """Prompts that repeat a phrase (what prompt lookup feeds on), of several lengths."""
    return [p * r for p, r in zip(random_prompts([5, 7, 3, 9, 4], seed=seed), [4, 3, 6, 2, 5],
                                  strict=True)]


def tokens_of(outs):
    return {rid: o.outputs[0].token_ids for rid, o in outs.items()}


def spec_counts(eng):
    s = eng.get_stats()
    return s.spec_num_draft_tokens, s.spec_num_accepted_tokens


def assert_prefix_hashes_verified(eng, outs):
    """Every block hash in the prefix cache is the chained hash of real tokens of a request."""
    bs = eng.block_manager.block_size
    real = set()
    for out in outs.values():
        for o in out.outputs:
            tokens, prev = out.prompt_token_ids + o.token_ids, b""
            for j in range(len(tokens) // bs):
                data = prev + b"".join(t.to_bytes(4, "little") for t in tokens[j * bs:(j + 1) * bs])
                prev = hashlib.sha256(data).digest()
                real.add(prev)
    for pool in eng.block_manager.pools:
        assert set(pool.cached) <= real


@pytest.mark.parametrize("variant", VARIANTS)
def test_ngram_greedy_is_identical_in_a_batch(tiny, variant):
    _, model = tiny(variant)
    prompts = repetitive_prompts()
    max_tokens = [30, 12, 25, 18, 40]
    requests = [(str(i), p, greedy(m)) for i, (p, m) in enumerate(zip(prompts, max_tokens,
                                                                       strict=True))]
    expected = tokens_of(drain(engine(model), {0: requests}))
    # requests joining later, a small budget that chunks prompts beside verifying decodes
    eng = engine(model, max_num_batched_tokens=24, max_num_seqs=8, **NGRAM)
    outs = drain(eng, {0: requests[:3], 4: requests[3:]})
    assert tokens_of(outs) == expected
    drafts, accepted = spec_counts(eng)
    assert accepted > 0
    assert_prefix_hashes_verified(eng, outs)


def test_ngram_under_preemption_and_a_tiny_pool(tiny):
    _, model = tiny("gemma3-gqa")
    requests = [(str(i), p, greedy(36)) for i, p in enumerate(repetitive_prompts(seed=1))]
    expected = tokens_of(drain(engine(model), {0: requests}))
    eng = engine(model, num_kv_blocks=7, max_num_batched_tokens=32, max_num_seqs=5, **NGRAM)
    outs = drain(eng, {0: requests})  # drain asserts every block came back
    assert eng.get_stats().num_preemptions > 0
    assert tokens_of(outs) == expected
    assert spec_counts(eng)[1] > 0


def test_block_size_smaller_than_the_drafts(tiny):
    """K + 1 positions spanning several blocks: rollback gives back more than one block."""
    _, model = tiny("gemma2-gqa")
    requests = [(str(i), p, greedy(30)) for i, p in enumerate(repetitive_prompts(seed=2))]
    expected = tokens_of(drain(engine(model, block_size=2), {0: requests}))
    eng = engine(model, block_size=2, **{**NGRAM, "num_speculative_tokens": 6})
    outs = drain(eng, {0: requests})
    assert tokens_of(outs) == expected
    assert_prefix_hashes_verified(eng, outs)


def test_stops_max_tokens_min_tokens_and_logprobs(tiny):
    _, model = tiny("gemma3-gqa")
    tok = CharTokenizer()
    prompts = repetitive_prompts(seed=3)
    plain = tokens_of(drain(engine(model, tok), {0: [(str(i), p, greedy(40))
                                                    for i, p in enumerate(prompts)]}))
    cases = []
    for i, p in enumerate(prompts):
        out = plain[str(i)]
        stop_token = out[9]
        text = tok.decode(out[6:8])
        cases += [(f"tok{i}", p, greedy(40, stop_token_ids=[stop_token])),
                  (f"min{i}", p, greedy(40, stop_token_ids=[stop_token], min_tokens=15)),
                  (f"str{i}", p, greedy(40, stop=[text])),
                  (f"len{i}", p, greedy(7 + i)),
                  (f"lp{i}", p, greedy(20, logprobs=2))]
    expected = drain(engine(model, tok), {0: cases})
    eng = engine(model, tok, **NGRAM)
    got = drain(eng, {0: cases})
    assert spec_counts(eng)[1] > 0
    for rid, want in expected.items():
        a, b = want.outputs[0], got[rid].outputs[0]
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (
            a.token_ids, a.text, a.finish_reason, a.stop_reason), rid
        if a.logprobs is not None:
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert x.keys() == y.keys()
                for t in x:
                    assert y[t].rank == x[t].rank
                    assert y[t].logprob == pytest.approx(x[t].logprob, abs=1e-4)


@pytest.mark.parametrize("variant", ["gemma2-gqa", "gemma3-gqa"])
def test_draft_model_greedy_is_identical(tiny, variant):
    _, model = tiny(variant)
    _, other = tiny(variant, seed=1)
    requests = [(str(i), p, greedy(24)) for i, p in enumerate(repetitive_prompts(seed=4))]
    expected = tokens_of(drain(engine(model), {0: requests}))
    config = dict(speculative_method="draft", num_speculative_tokens=3,
                  speculative_disable_by_batch_size=0)
    same = engine(model, draft=model, **config)
    outs = drain(same, {0: requests[:2], 3: requests[2:]})
    assert tokens_of(outs) == expected
    drafts, accepted = spec_counts(same)
    assert drafts > 0 and accepted == drafts  # the target drafting for itself: all accepted
    assert same.speculator.proposer.block_manager.all_free() or same.speculator.proposer.shadows
    for out in outs.values():
        assert out.metrics.spec_acceptance_rate == 1.0
        assert out.metrics.spec_mean_accepted_length > 1.0
    diff = engine(model, draft=other, num_kv_blocks=8, max_num_batched_tokens=32, max_num_seqs=8,
                  **config)
    assert tokens_of(drain(diff, {0: requests})) == expected
    drafts, accepted = spec_counts(diff)
    assert accepted < drafts


def test_draft_vocabulary_must_match(tiny):
    _, model = tiny("gemma3-gqa")
    _, other = tiny("gemma2-gqa")
    other.config = type(other.config)(**{**other.config.__dict__, "vocab_size": 600})
    with pytest.raises(ConfigError, match="vocabulary"):
        engine(model, draft=other, speculative_method="draft")
    with pytest.raises(ConfigError, match="draft_model"):
        engine(model, speculative_method="draft")


def test_no_drafts_above_the_batch_limit_nor_under_a_grammar_free_budget(tiny):
    _, model = tiny("gemma3-gqa")
    requests = [(str(i), p, greedy(12)) for i, p in enumerate(repetitive_prompts(seed=5))]
    eng = engine(model, **{**NGRAM, "speculative_disable_by_batch_size": 2})
    drain(eng, {0: requests})  # five decoding at once: no step proposes
    assert spec_counts(eng) == (0, 0)


def _brute_force_ngram(tokens, k, n_min, n_max):
    for n in range(n_max, n_min - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest earlier occurrence
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_proposals_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = rng.integers(0, 4, size=int(rng.integers(1, 30))).tolist()
        k, lo = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 3))
        got = propose_ngram(np.asarray(tokens), k, lo, hi)
        assert got == _brute_force_ngram(tokens, k, lo, hi), (tokens, k, lo, hi)
    assert propose_ngram(np.asarray([1, 2, 3, 4, 2, 3]), 4, 2, 3) == [4, 2, 3]


def test_adaptive_k_and_caps():
    config = EngineConfig(**NGRAM)
    sp = Speculator(config, proposer=None, max_model_len=100)
    seq = Sequence(0, "r", 0, list(range(90)), SamplingParams(max_tokens=50), 0, 1)
    assert sp._k(seq) == 4
    sp.record(seq, 4, 1)
    assert sp._k(seq) == 2  # one more than were accepted
    sp.record(seq, 2, 2)
    assert sp._k(seq) == 4
    seq.token_ids += [5] * 8  # 98 of 100 tokens: one draft fits before the context ends
    assert sp._k(seq) == 1
    assert (seq.num_draft_tokens, seq.num_accepted_tokens, seq.num_verifications) == (6, 3, 2)


# -- rejection sampling keeps the target's distribution --------------------------------------------
def _target_rows(hf, contexts, temperature, top_k):
    """The exact distributions (plain PyTorch on transformers' logits): softmax(top-k(l / T))."""
    with torch.no_grad():
        logits = torch.stack([hf(torch.tensor([c])).logits[0, -1].float() for c in contexts])
    x = logits / temperature
    kth = x.topk(top_k, dim=-1).values[:, -1:]
    x = x.masked_fill(x < kth, float("-inf"))
    return logits, torch.softmax(x, dim=-1)


def _chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson's test at p ~ 1e-4 over the support (scipy-free: the Wilson-Hilferty bound)."""
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the target's support was emitted"
    n, p = counts.sum(), probs[keep] / probs[keep].sum()
    stat = (((counts[keep] - n * p) ** 2) / (n * p)).sum()
    dof = keep.sum() - 1
    z = 3.72  # one-sided 1e-4
    limit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    return stat < limit


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_rejection_sampling_matches_the_target_distribution(tiny, proposer):
    hf, _ = tiny("gemma3-gqa")
    hf_draft, _ = tiny("gemma3-gqa", seed=1)
    prompt = random_prompts([6], seed=7)[0]
    params = SamplingParams(temperature=0.7, top_k=6, max_tokens=8)
    logits0, p0 = _target_rows(hf, [prompt], 0.7, 6)
    trials = 6000
    sampler = Sampler(frozenset({1}), "cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    if proposer == "ngram":  # fixed drafts: d1 the target's 2nd most likely token
        d1 = int(p0[0].argsort(descending=True)[1])
        first_drafts = torch.full((trials,), d1)
        q0 = None
    else:  # drafts drawn from a distribution unlike the target's: half another model's
        _, other = _target_rows(hf_draft, [prompt], 0.7, 6)  # (support partly outside p's)
        q0 = 0.5 * other + 0.5 * p0
        first_drafts = torch.multinomial(q0[0], trials, replacement=True, generator=g)
    # the second row depends on the first draft: one target row per distinct d1
    d1_values = sorted(set(first_drafts.tolist()))
    logits1, p1 = _target_rows(hf, [prompt + [d] for d in d1_values], 0.7, 6)
    row_of = {d: i for i, d in enumerate(d1_values)}
    d2 = {d: int(p1[i].argmax()) for d, i in row_of.items()}  # a likely second draft
    seqs, rows = [], []
    for t in range(trials):
        d = int(first_drafts[t])
        seq = Sequence(t, "r", 0, prompt, params, 0, 1, torch.Generator().manual_seed(1000 + t))
        seq.spec_tokens = [d, d2[d]]
        if q0 is not None:  # draft 2 is a point mass here: q1 = one-hot (a valid proposal)
            seq.spec_probs = torch.stack([q0[0], torch.nn.functional.one_hot(
                torch.tensor(d2[d]), p0.shape[1]).float()])
        seqs.append(seq)
        rows += [logits0[0], logits1[row_of[d]], logits1[row_of[d]]]  # row 2: unused bonus
    results = verify(sampler, torch.stack(rows), seqs)
    first = np.bincount([r.tokens[0] for r in results], minlength=p0.shape[1])
    assert _chi_square_ok(first, p0[0].numpy())
    # given draft 1 accepted, the next token follows the target's row after it
    common = max(d1_values, key=lambda d: sum(
        1 for r, s in zip(results, seqs, strict=True)
        if len(r.tokens) > 1 and s.spec_tokens[0] == d))
    second = np.bincount([r.tokens[1] for r, s in zip(results, seqs, strict=True)
                          if len(r.tokens) > 1 and s.spec_tokens[0] == common],
                         minlength=p0.shape[1])
    assert second.sum() > 500
    assert _chi_square_ok(second, p1[row_of[common]].numpy())


def test_seeded_sampling_with_speculation_is_reproducible(tiny):
    _, model = tiny("gemma3-gqa")
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=s,
                             repetition_penalty=1.1) for s in range(4)]
    requests = [(str(i), p, params[i % 4]) for i, p in enumerate(repetitive_prompts(seed=8))]
    runs = []
    for extra in ([], requests[:1]):  # the second run has a different batch around them
        eng = engine(model, **NGRAM)
        sched = {0: requests} if not extra else {0: [("x", extra[0][1], greedy(9))] + requests}
        outs = drain(eng, sched)
        runs.append({r: o.outputs[0].token_ids for r, o in outs.items() if r != "x"})
        assert spec_counts(eng)[0] > 0
    assert runs[0] == runs[1]


def test_metrics_expose_acceptance_counts(tiny):
    from trt_gemma.server.metrics import ServerMetrics

    _, model = tiny("gemma3-gqa")
    eng = engine(model, **NGRAM)
    outs = drain(eng, {0: [(str(i), p, greedy(20)) for i, p in enumerate(repetitive_prompts())]})
    stats = eng.get_stats()
    assert stats.spec_num_draft_tokens == sum(o.metrics.spec_num_draft_tokens
                                              for o in outs.values())
    assert stats.spec_num_accepted_tokens == sum(stats.spec_accepted_per_position) > 0
    text = ServerMetrics(lambda: stats, "m").exposition().decode()
    for name, value in [("spec_decode_num_drafts", stats.spec_num_drafts),
                        ("spec_decode_num_draft_tokens", stats.spec_num_draft_tokens),
                        ("spec_decode_num_accepted_tokens", stats.spec_num_accepted_tokens)]:
        assert f'trt_gemma_{name}_total{{model_name="m"}} {float(value)}' in text
    assert 'trt_gemma_spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"}' \
        in text or 'position="0",model_name="m"' in text


def test_sampled_draft_from_the_target_itself_accepts_every_draft(tiny):
    """q = p exactly (the same model, processed the same way): rejection sampling must accept
    every draft (u * q(x) < p(x) for u < 1), through penalties, top-p and seeds."""
    _, model = tiny("gemma2-gqa")
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=s,
                             presence_penalty=0.3) for s in range(3)]
    requests = [(str(i), p, params[i]) for i, p in enumerate(repetitive_prompts(seed=9)[:3])]
    eng = engine(model, draft=model, speculative_method="draft", num_speculative_tokens=3)
    outs = drain(eng, {0: requests})
    drafts, accepted = spec_counts(eng)
    assert drafts > 0 and accepted == drafts
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs.values())


@pytest.mark.slow
def test_triton_path_verifies_drafts_as_the_reference_path_decodes(tiny, monkeypatch):
    """Slow (~1 min: the Triton kernels interpreted on CPU): drafts verified through the Triton
    paged decode attention (one query row per draft position) give the reference's tokens."""
    pytest.importorskip("triton")
    _, model = tiny("gemma3-gqa")
    requests = [(str(i), p, greedy(14)) for i, p in enumerate(repetitive_prompts(seed=10)[:2])]
    expected = tokens_of(drain(engine(model, greedy_head_max_rows=0, block_size=4),
                               {0: requests}))
    monkeypatch.setenv("TRT_GEMMA_TRITON_ON_CPU", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    eng = engine(model, greedy_head_max_rows=0, block_size=4, **NGRAM)
    assert tokens_of(drain(eng, {0: requests})) == expected
    assert spec_counts(eng)[1] > 0
