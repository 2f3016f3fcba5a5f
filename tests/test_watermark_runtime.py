"""SynthID-Text watermarking through LLMEngine on a tiny random Gemma 3, against transformers:
greedy tokens equal to ``generate(..., watermarking_config=...)``, sampled distributions equal to
transformers' processor chain (temperature, top-k, top-p, then the watermark, the order of its
``_get_logits_processor``) at every step, detection of our output, n > 1, preemption and
speculative decoding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from runtime_helpers import drain, greedy, make_engine, random_prompts, tiny_models  # noqa: E402
from transformers import SynthIDTextWatermarkingConfig  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trt_gemma.responsible.detect import detect  # noqa: E402
from trt_gemma.responsible.synthid import WatermarkConfig, Watermarker  # noqa: E402
from trt_gemma.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = (654, 400, 836, 123, 340, 443, 597, 160, 57, 2**62 + 12345)
CONFIG = WatermarkConfig(keys=KEYS, ngram_len=4)


def hf_config(config: WatermarkConfig = CONFIG) -> SynthIDTextWatermarkingConfig:
    return SynthIDTextWatermarkingConfig(keys=list(config.keys), ngram_len=config.ngram_len)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("gemma3-wm"), "gemma3-gqa")


def outputs(finished, rid):
    return [o.token_ids for o in finished[rid].outputs]


def test_greedy_equals_transformers_generate_with_its_watermark(tiny):
    hf, model = tiny
    prompts = random_prompts([4, 11, 7], seed=3)
    # min_tokens, not ignore_eos: eos is masked before the watermark, as min_new_tokens does
    held = SamplingParams(max_tokens=20, min_tokens=20, temperature=0.0)
    requests = [(str(i), p, held) for i, p in enumerate(prompts)]
    marked = drain(make_engine(model, watermark=CONFIG), {0: requests})  # engine-wide
    plain = drain(make_engine(model), {0: requests})
    changed = 0
    for i, prompt in enumerate(prompts):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, watermarking_config=hf_config(), pad_token_id=0)
        assert outputs(marked, str(i))[0] == ref[0, len(prompt):].tolist()
        changed += outputs(marked, str(i)) != outputs(plain, str(i))
    assert changed  # the watermark moved some argmax (else this test could not fail)
    # Per request: its own config on a plain engine; False opts out of an engine-wide one.
    own = SamplingParams(max_tokens=20, min_tokens=20, temperature=0.0, watermark=CONFIG)
    out = drain(make_engine(model), {0: [("own", prompts[0], own)]})
    assert outputs(out, "own") == outputs(marked, "0")
    off = SamplingParams(max_tokens=20, min_tokens=20, temperature=0.0, watermark=False)
    out = drain(make_engine(model, watermark=CONFIG), {0: [("off", prompts[0], off)]})
    assert outputs(out, "off") == outputs(plain, "0")


def record_processed_rows(engine) -> dict:
    """Wrap the sampler's process: {(request id, sample index): [(tokens so far, probs row)]}."""
    seen: dict = {}
    original = engine.sampler.process

    def process(logits, seqs):
        rows = original(logits, seqs)
        for j, i in enumerate(rows.random_rows):
            seq = seqs[i]
            seen.setdefault((seq.request_id, seq.index), []).append(
                (list(seq.token_ids), rows.probs[j].clone()))
        return rows

    engine.sampler.process = process
    return seen


def test_sampled_distributions_equal_transformers_processor_chain(tiny):
    """Every step of seeded sampling (n = 2: forked states) draws from exactly the distribution
    transformers' warpers + SynthID processor give on the same prefix."""
    hf, model = tiny
    params = SamplingParams(n=2, temperature=0.7, top_k=60, top_p=0.95, seed=5, max_tokens=14,
                            ignore_eos=True)
    engine = make_engine(model, watermark=CONFIG)
    seen = record_processed_rows(engine)
    prompts = random_prompts([6, 9], seed=4)
    drain(engine, {0: [(str(i), p, params) for i, p in enumerate(prompts)]})
    assert len(seen) == 4 and all(len(steps) == 14 for steps in seen.values())
    worst_watermark_effect = 0.0
    for steps in seen.values():
        chain = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(60), TopPLogitsWarper(0.95),
                 hf_config().construct_processor(model.config.vocab_size, "cpu")]
        for tokens, probs in steps:  # in order: the processor's state follows the prefix
            ids = torch.tensor([tokens])
            with torch.no_grad():
                scores = hf(ids).logits[:, -1, :].float()
            unmarked = scores
            for processor in chain:
                unmarked, scores = scores, processor(ids, scores)
            expected = torch.softmax(scores, dim=-1)[0]
            torch.testing.assert_close(probs, expected, rtol=0, atol=2e-5)
            worst_watermark_effect = max(worst_watermark_effect, float(
                (torch.softmax(unmarked, dim=-1)[0] - expected).abs().max()))
    assert worst_watermark_effect > 0.01  # the watermark did change the distributions


def test_engine_output_is_detected(tiny):
    _, model = tiny
    prompts = random_prompts([5, 8, 3], seed=7)
    params = SamplingParams(temperature=1.0, max_tokens=80, ignore_eos=True, seed=1)
    requests = [(str(i), p, params) for i, p in enumerate(prompts)]
    marked = drain(make_engine(model, watermark=CONFIG), {0: requests})
    plain = drain(make_engine(model), {0: requests})
    watermarker = Watermarker(CONFIG)
    for i in range(len(prompts)):
        on = detect(watermarker, outputs(marked, str(i))[0], eos_token_ids=[1])
        off = detect(watermarker, outputs(plain, str(i))[0], eos_token_ids=[1])
        assert on.num_scored_tokens > 50
        assert on.p_value < 1e-4 and on.score > off.score
        assert off.p_value > 1e-3


def test_n_samples_and_preemption_keep_the_states(tiny):
    _, model = tiny
    prompts = random_prompts([10, 14, 7, 12], seed=2)
    sampled = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)
    requests = [(str(i), p, greedy(24) if i % 2 else sampled) for i, p in enumerate(prompts)]
    expected = drain(make_engine(model, watermark=CONFIG), {0: requests})
    small = make_engine(model, watermark=CONFIG, num_kv_blocks=6, max_num_batched_tokens=32,
                        max_num_seqs=4)
    got = drain(small, {0: requests})
    assert small.get_stats().num_preemptions > 0
    for rid in expected:
        assert outputs(got, rid) == outputs(expected, rid)
    # greedy n = 3: each fork watermarks as a lone request does
    alone = drain(make_engine(model, watermark=CONFIG), {0: [("a", prompts[0], greedy(12))]})
    forked = drain(make_engine(model, watermark=CONFIG),
                   {0: [("f", prompts[0], greedy(12, n=3))]})
    assert outputs(forked, "f") == outputs(alone, "a") * 3


def test_speculative_engine_equals_plain_engine(tiny):
    """Watermarked sequences do not speculate, so their output is the non-speculative one; an
    opted-out request in the same batch still does."""
    _, model = tiny
    prompts = [p * 4 for p in random_prompts([5, 6, 4], seed=8)]  # repeats: n-gram drafts
    sampled = SamplingParams(temperature=0.8, seed=9, max_tokens=16, ignore_eos=True)
    off = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, watermark=False)
    requests = [("g", prompts[0], greedy(16)), ("s", prompts[1], sampled),
                ("off", prompts[2], off)]
    plain = drain(make_engine(model, watermark=CONFIG), {0: requests})
    spec_engine = make_engine(model, watermark=CONFIG, speculative_method="ngram",
                              num_speculative_tokens=3)
    spec = drain(spec_engine, {0: requests})
    for rid, _, _ in requests:
        assert outputs(spec, rid) == outputs(plain, rid)
    assert spec["g"].metrics.spec_num_drafts == spec["s"].metrics.spec_num_drafts == 0
    assert spec["off"].metrics.spec_num_drafts > 0
