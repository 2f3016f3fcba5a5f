"""The runtime's FP8 KV cache: per-layer scales from the model, e4m3 storage in the paged cache,
the same greedy tokens as a contiguous cache that rounds keys/values through e4m3 the same way,
whatever the batching, chunking, prefix caching and pool size."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import (
    drain,
    greedy,
    make_engine,
    random_prompts,
    tiny_models,
)

from trt_gemma.errors import ConfigError
from trt_gemma.kernels.reference import FP8_DTYPE
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.model import GemmaModel

pytestmark = pytest.mark.usefixtures("one_thread")


class _AmaxCache(ContiguousKVCache):
    """Records each layer's amax of keys and values (what calibration computes)."""

    amax: dict[int, list[float]] = {}

    def attend(self, layer, q, k, v, **kw):
        old = self.amax.get(layer, [0.0, 0.0])
        self.amax[layer] = [max(old[0], float(k.abs().max())), max(old[1], float(v.abs().max()))]
        return super().attend(layer, q, k, v, **kw)


class _Fp8RoundingCache(ContiguousKVCache):
    """The independent reference: keys/values rounded as e4m3 of value / scale, times scale."""

    scales: list[tuple[float, float]] = []

    def attend(self, layer, q, k, v, **kw):
        ks, vs = self.scales[layer]
        k = ((k.float() / ks).clamp(-448, 448).to(FP8_DTYPE).float() * ks).to(k.dtype)
        v = ((v.float() / vs).clamp(-448, 448).to(FP8_DTYPE).float() * vs).to(v.dtype)
        return super().attend(layer, q, k, v, **kw)


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    _, model = tiny_models(tmp_path_factory.mktemp("g3"), "gemma3-gqa")
    _AmaxCache.amax = {}
    for prompt in random_prompts([20, 31], seed=3):
        _AmaxCache(model.config, len(prompt), model.dtype).forward(model, torch.tensor(prompt))
    scales = [(_AmaxCache.amax[i][0] / 448, _AmaxCache.amax[i][1] / 448)
              for i in range(model.config.num_hidden_layers)]
    return GemmaModel(model.config, model.embed, model.layers, model.final_norm, model.lm_head,
                      scales)


def _reference(model, prompt, n):
    _Fp8RoundingCache.scales = model.kv_scales
    cache = _Fp8RoundingCache(model.config, len(prompt) + n, model.dtype)
    hidden, out = cache.forward(model, torch.tensor(prompt)), []
    for _ in range(n):
        out.append(int(model.compute_logits(hidden[-1:]).argmax()))
        hidden = cache.forward(model, torch.tensor(out[-1:]))
    return out


def test_fp8_cache_matches_the_rounding_reference_under_any_batching(fp8_model):
    prompts = random_prompts([5, 40, 12], seed=4)
    prompts.append(prompts[1][:20] + [7, 8, 9])  # shares a full block with prompt 1: prefix hit
    expected = [_reference(fp8_model, p, 10) for p in prompts]
    for config in (dict(), dict(max_num_batched_tokens=8, max_num_seqs=2),
                   dict(num_kv_blocks=14, block_size=4)):  # chunked prefill / preemption
        engine = make_engine(fp8_model, kv_cache_dtype="fp8", greedy_head_max_rows=0, **config)
        assert engine.runner.kv_cache.k[0].dtype == FP8_DTYPE
        requests = [(str(i), p, greedy(10)) for i, p in enumerate(prompts)]
        outs = drain(engine, {0: requests[:3], 3: requests[3:]})  # 3 joins after 1 is cached
        assert [outs[str(i)].outputs[0].token_ids for i in range(4)] == expected, config
        stats = engine.get_stats()
        if "num_kv_blocks" in config:
            assert stats.num_preemptions > 0
        elif "max_num_seqs" not in config:
            assert stats.prefix_cache_hit_tokens > 0


def test_auto_keeps_fp32_on_cpu_and_model_opts_out(fp8_model):
    assert make_engine(fp8_model).runner.kv_cache.k[0].dtype == torch.float32
    assert make_engine(fp8_model, kv_cache_dtype="model").runner.kv_cache.scales is None


def test_fp8_without_scales_is_a_clear_error(tmp_path):
    _, model = tiny_models(tmp_path, "gemma2-gqa")
    with pytest.raises(ConfigError, match="--kv-cache-dtype fp8"):
        make_engine(model, kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        make_engine(model, kv_cache_dtype="int8")


def test_engine_built_with_fp8_kv_generates_with_it(tiny_gemma3_dir, tmp_path, capsys):
    from trt_gemma import cli
    from trt_gemma.converter.engine import BuildOptions, build_engine
    from trt_gemma.llm import LLM
    from trt_gemma.loader import load_model

    out = tmp_path / "engine"
    build_engine(tiny_gemma3_dir, out, BuildOptions(kv_cache_dtype="fp8", dtype="float32",
                                                    calib_tokens=256, calib_rows=64),
                 progress=False, log=lambda m: None)
    model, _ = load_model(out, dtype="float32")
    assert model.kv_scales is not None and len(model.kv_scales) == model.config.num_hidden_layers
    assert all(k > 0 and v > 0 for k, v in model.kv_scales)
    prompt = [2, *random_prompts([9], vocab=60, seed=8)[0]]
    llm = LLM(str(out), dtype="float32", kv_cache_dtype="fp8", greedy_head_max_rows=0)
    got = llm.generate([prompt], greedy(8))[0].outputs[0].token_ids
    assert got == _reference(model, prompt, 8)
    code = cli.main(["generate", str(out), "ab", "--max-tokens", "4", "--kv-cache-dtype", "fp8",
                     "--dtype", "float32", "--quiet"])
    assert code == 0
    capsys.readouterr()
    code = cli.main(["generate", str(out), "ab", "--kv-cache-dtype", "int8", "--dtype", "float32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "kv_cache_dtype" in err[0] and "'int8'" in err[0]


@pytest.mark.parametrize(("capability", "expected"), [((8, 0), torch.bfloat16),
                                                      ((8, 6), torch.bfloat16),
                                                      ((8, 9), FP8_DTYPE), ((9, 0), FP8_DTYPE)])
def test_fp8_cache_only_on_gpus_with_fp8(monkeypatch, caplog, capability, expected):
    """Ampere gets one warning and a bf16 cache (Triton cannot compile e4m3 there), never an
    error at the first forward; Ada and Hopper get the FP8 cache."""
    from types import SimpleNamespace

    from trt_gemma.runtime.engine import choose_kv_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    model = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16,
                            embed=torch.zeros(1, dtype=torch.bfloat16), kv_scales=[(1.0, 1.0)])
    for asked in ("auto", "fp8"):
        caplog.clear()
        assert choose_kv_dtype(model, asked) == expected
        warned = [r for r in caplog.records if "FP8 KV cache" in r.getMessage()]
        assert len(warned) == (expected != FP8_DTYPE)
    assert choose_kv_dtype(model, "model") == torch.bfloat16
