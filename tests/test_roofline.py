"""benchmarks/roofline.py: its byte arithmetic against independent counts.

bf16 sizes against transformers' parameter counts (tiny random models, and the real presets'
shapes built on the meta device); what the model reads per step against our own ``GemmaModel``'s
tensors; fp8 / int4-awq sizes against real ``Fp8Weight`` / ``Int4Weight`` objects from
``trt_gemma.quant``; KV bytes against a ``KVCache`` holding exactly the keys a step reads.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny import make_tiny_hf_model

from trt_gemma.checkpoint.hf import canonical_hf_name
from trt_gemma.config import GemmaConfig, preset
from trt_gemma.kernels.reference import FP8_DTYPE
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.model import GemmaModel
from trt_gemma.quant import quantize_fp8, quantize_int4_awq
from trt_gemma.runtime.block_manager import KVGroup, layer_groups
from trt_gemma.runtime.paged_attention import KVCache

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "roofline.py"
_spec = importlib.util.spec_from_file_location("roofline", _PATH)
roofline = importlib.util.module_from_spec(_spec)
sys.modules["roofline"] = roofline  # dataclasses look their module up while the class is built
_spec.loader.exec_module(roofline)

TINY = ("gemma1-mqa", "gemma2-gqa", "gemma3-gqa")


def _tiny(variant: str) -> tuple[torch.nn.Module, GemmaConfig]:
    hf = make_tiny_hf_model(variant)
    return hf, GemmaConfig.from_hf_config(hf.config.to_dict())


def _wide_config() -> GemmaConfig:
    """Gemma 3 layout with widths that give full, partial and single INT4 groups of 128."""
    return GemmaConfig(architecture="gemma3", vocab_size=300, hidden_size=320,
                       intermediate_size=384, num_hidden_layers=6, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=48, max_position_embeddings=512,
                       sliding_window=16, use_qk_norm=True, use_post_norms=True,
                       layer_types=("sliding_attention",) * 5 + ("full_attention",))


@pytest.mark.parametrize("variant", TINY)
def test_bf16_bytes_are_twice_transformers_parameter_count(variant):
    hf, config = _tiny(variant)
    params = dict(hf.named_parameters())  # tied embedding listed once
    assert roofline.stored_weight_bytes(config, "bf16") == 2 * sum(
        p.numel() for p in params.values())
    linears = sum(p.numel() for n, p in params.items() if n.endswith("proj.weight"))
    assert roofline.decoder_linear_bytes(config, "bf16") == 2 * linears


@pytest.mark.parametrize("name", roofline.MODELS)
def test_real_shapes_match_transformers_on_meta_device(name):
    """The presets' bf16 bytes equal 2 x the parameters of transformers' model of that shape."""
    import transformers

    cfg = preset(name)
    cls = {"gemma": ("GemmaConfig", "GemmaForCausalLM"),
           "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
           "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}[cfg.architecture]
    hf_config = getattr(transformers, cls[0])(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)
    with torch.device("meta"):
        model = getattr(transformers, cls[1])(hf_config)
    assert roofline.stored_weight_bytes(cfg, "bf16") == 2 * model.num_parameters()


@pytest.mark.parametrize("variant", TINY)
def test_step_reads_what_gemma_model_holds(variant):
    """Linears, RMSNorm factors and embedding rows as our bf16 model stores and applies them."""
    hf, config = _tiny(variant)
    weights = {canonical_hf_name(n, config): t for n, t in hf.state_dict().items()}
    weights = {n: t for n, t in weights.items() if n is not None}
    model = GemmaModel.from_state_dict(config, weights, dtype=torch.bfloat16,
                                       pack_cpu_linears=False)
    linears = sum(t.nbytes for w in model.layers for t in (w.qkv, w.o, w.gate_up, w.down))
    norms = model.final_norm_scale.nbytes + sum(
        t.nbytes for ns in model.norm_scales
        for t in (ns.input, ns.post_attn, ns.pre_ff, ns.post_ff, ns.qk) if t is not None)
    ids = torch.tensor([3, 7, 7, 11, 0])
    parts = roofline.step_bytes(config, "bf16", "bf16", context=8, batch=len(ids))
    assert parts["decoder_linears"] == linears
    assert parts["norms"] == norms
    assert parts["embedding_rows"] == model.embed[ids].nbytes
    assert parts["lm_head"] == model.lm_head.nbytes  # tied: the whole embedding matrix


@pytest.mark.parametrize("prompt", [5, 10])  # gemma3-gqa's window is 6: 10 + 1 keys slide
@pytest.mark.parametrize("variant", ["gemma1-mqa", "gemma3-gqa"])
def test_flops_equal_torch_flop_counter_on_a_decode_step(variant, prompt):
    """GEMM and attention FLOPs of one decode token, as torch counts them in our model."""
    from torch.utils.flop_counter import FlopCounterMode

    hf, config = _tiny(variant)
    weights = {canonical_hf_name(n, config): t for n, t in hf.state_dict().items()}
    model = GemmaModel.from_state_dict(config, {n: t for n, t in weights.items() if n},
                                       pack_cpu_linears=False)
    cache = ContiguousKVCache(config, 16, torch.float32)
    cache.forward(model, torch.arange(1, prompt + 1))
    with FlopCounterMode(display=False) as counter:
        model.compute_logits(cache.forward(model, torch.tensor([7])))
    flops = roofline.step_flops(config, context=prompt + 1, batch=1)
    assert counter.get_total_flops() == sum(flops.values())


@pytest.mark.parametrize("config", [_wide_config(), _tiny("gemma2-gqa")[1]],
                         ids=["groups-128-partial", "tiny-gemma2"])
def test_quantized_bytes_match_real_weight_objects(config):
    torch.manual_seed(0)
    fp8 = int4 = 0
    for _, out, inp in roofline.linear_shapes(config):
        w = torch.randn(out, inp).bfloat16()
        q8 = quantize_fp8(w, per_channel=True, input_scale=0.01)
        # the converter's int4-awq: zero points, bf16 scales, bf16 pre_quant_scale per linear
        q4 = quantize_int4_awq(w, group_size=roofline.GROUP_SIZE, scales=torch.rand(inp) + 0.5,
                               symmetric=False, scale_dtype=torch.bfloat16)
        assert q4.zeros is not None and q4.pre_quant_scale is not None
        n8 = sum(t.nbytes for t in q8.tensors().values())
        n4 = sum(t.nbytes for t in q4.tensors().values())
        assert roofline.linear_bytes(out, inp, "fp8") == n8
        assert roofline.linear_bytes(out, inp, "int4-awq") == n4
        fp8, int4 = fp8 + n8, int4 + n4
    layers = config.num_hidden_layers
    assert roofline.decoder_linear_bytes(config, "fp8") == layers * fp8
    assert roofline.decoder_linear_bytes(config, "int4-awq") == layers * int4


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("context,batch", [(8, 1), (48, 3)])
@pytest.mark.parametrize("config", [_wide_config(), _tiny("gemma1-mqa")[1]],
                         ids=["sliding", "full"])
def test_kv_bytes_equal_a_cache_of_exactly_the_keys_read(config, context, batch, kv_dtype):
    """A paged cache sized to each sequence's visible keys (window layers: the window only)."""
    block = 8
    groups = [KVGroup(layers, window, batch * math.ceil(min(context, window or context) / block))
              for layers, window in layer_groups(config)]
    fp8 = kv_dtype == "fp8"
    cache = KVCache(groups, block, config.num_key_value_heads, config.head_dim,
                    FP8_DTYPE if fp8 else torch.bfloat16, torch.device("cpu"),
                    scales=[(0.5, 0.25)] * config.num_hidden_layers if fp8 else None)
    scales = sum(t.nbytes for s in cache.scales for t in s.values()) if fp8 else 0
    assert roofline.kv_read_bytes(config, context, batch, kv_dtype) == cache.nbytes() + scales


def test_sliding_layers_cap_the_kv_a_step_reads():
    cfg = preset("gemma-3-4b")  # 34 layers: every 6th global (5), 29 local with window 1024
    per_token = 2 * cfg.kv_size * 2
    assert roofline.kv_read_bytes(cfg, 8192, 1, "bf16") == per_token * (29 * 1024 + 5 * 8192)
    assert roofline.kv_read_bytes(cfg, 1000, 1, "bf16") == per_token * 34 * 1000


def test_prediction_is_bytes_over_bandwidth_plus_launches():
    cfg, gpu = preset("gemma-2-9b"), roofline.GPUS[0]
    # embedding gather + scale, the first input norm, LM head, two sampling kernels
    assert roofline.launches_per_step(cfg) == 42 * roofline.DECODE_LAUNCHES_PER_LAYER + 6
    p1 = roofline.predict(cfg, "int4-awq", "fp8", 8192, 1, gpu)
    p64 = roofline.predict(cfg, "int4-awq", "fp8", 8192, 64, gpu)
    total = roofline.step_bytes(cfg, "int4-awq", "fp8", 8192, 1)["total"]
    launch_ms = (42 * 10 + 6) * 2.5e-3
    assert p1["step_ms"] == pytest.approx(total / 3.35e9 + launch_ms)
    assert p1["tokens_per_s"] == pytest.approx(1e3 / p1["step_ms"])
    assert p1["launch_share"] == pytest.approx(launch_ms / p1["step_ms"])
    assert p64["tokens_per_s"] == pytest.approx(64e3 / p64["step_ms"])


def test_write_docs_replaces_only_its_section(tmp_path):
    doc = tmp_path / "kernels.md"
    other = "<!-- compile-table:begin -->\n| keep | me |\n<!-- compile-table:end -->\n"
    doc.write_text(f"# Title\n\n{other}\n{roofline.BEGIN}\nold\n{roofline.END}\ntail\n")
    roofline.write_docs("new table", doc)
    roofline.write_docs("new table", doc)  # idempotent
    assert doc.read_text() == (f"# Title\n\n{other}\n{roofline.BEGIN}\nnew table\n"
                               f"{roofline.END}\ntail\n")


def test_cli_writes_json_for_every_model_and_mode(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    assert roofline.main(["--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["models"]) == list(roofline.MODELS)
    for m in data["models"].values():
        assert len(m["rows"]) == 3 * 2 * 2 * 2
        for r in m["rows"]:
            assert set(r["gpus"]) == {g.name for g in roofline.GPUS}
    assert "gemma-3-27b" in capsys.readouterr().out
