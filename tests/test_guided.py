"""Guided decoding: JSON schemas, regex, choice and EBNF constraints hold on a tiny random Gemma 3
with the real Gemma 3 tokenizer (random weights make the model wander: exactly what a
constraint must survive), greedy and sampled, beside unconstrained requests, with n > 1 and
preemption; the token bitmask against a plain-torch unpacking; compile errors and the cache."""

from __future__ import annotations

import json
import re

import pytest
import torch
from runtime_helpers import drain

from trt_gemma.config import FULL, SLIDING, GemmaConfig
from trt_gemma.guided import (
    GrammarError,
    GrammarState,
    GrammarViolation,
    mask_logits,
    tokenizer_info,
    unpack_bitmask,
)
from trt_gemma.model import GemmaModel
from trt_gemma.runtime import EngineConfig, LLMEngine
from trt_gemma.sampling_params import SamplingParams, StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 262144  # Gemma 3's: the real tokenizer's ids index the tiny model's logits

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 8},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"]},
        },
        "required": ["name", "address"],
    },
    "array_of_enums": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                "minItems": 1, "maxItems": 4, "uniqueItems": False}},
        "required": ["tags"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "score": {"type": "number", "minimum": -1.5, "maximum": 2.25},
                       "ok": {"type": "boolean"}},
        "required": ["age", "score", "ok"],
    },
    "optional_and_null": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 1000},
                       "note": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
                       "extra": {"type": "string", "maxLength": 3}},
        "required": ["id", "note"],
    },
    "refs_and_items": {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                           "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                            "required": ["x", "y"]}},
        "type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 3,
    },
    "pattern_and_const": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                       "kind": {"const": "order"},
                       "qty": {"type": "integer", "exclusiveMinimum": 0, "maximum": 50}},
        "required": ["code", "kind", "qty"],
    },
}


def _tiny_gemma3(vocab: int = VOCAB, seed: int = 0) -> GemmaModel:
    """Two layers, hidden 64, Gemma 3's vocabulary; random weights (logits spread widely)."""
    cfg = GemmaConfig(architecture="gemma3", vocab_size=vocab, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                      sliding_window=8, layer_types=(SLIDING, FULL), query_pre_attn_scalar=32,
                      use_qk_norm=True, use_post_norms=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    w = {"embed_tokens.weight": rand(vocab, 64, std=0.5), "norm.weight": rand(64, std=0.3)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            w[p + name + ".weight"] = rand(64, std=0.3)
        shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64),
                  "self_attn.v_proj": (32, 64), "self_attn.o_proj": (64, 64),
                  "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
                  "mlp.down_proj": (64, 128)}
        w.update({p + name + ".weight": rand(*shape) for name, shape in shapes.items()})
        w[p + "self_attn.q_norm.weight"] = rand(32, std=0.3)
        w[p + "self_attn.k_norm.weight"] = rand(32, std=0.3)
    return GemmaModel.from_state_dict(cfg, w)


@pytest.fixture(scope="module")
def tokenizer(real_gguf_path):
    from trt_gemma.tokenizer import GemmaTokenizer

    return GemmaTokenizer.from_gguf(real_gguf_path)


@pytest.fixture(scope="module")
def model():
    return _tiny_gemma3()


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    """One engine for the tests that leave it empty (drain checks that)."""
    return LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=32 << 20, max_num_seqs=64))


def _params(constraint: StructuredOutputsParams, temperature: float = 0.0, seed: int | None = None,
            **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 400)
    return SamplingParams(temperature=temperature, seed=seed, structured_outputs=constraint, **kw)


SAMPLINGS = [(0.0, None), (1.0, 1)]  # greedy, and sampled at temperature 1


def test_tokenizer_info_decodes_as_the_tokenizer(tokenizer):
    info = tokenizer_info(tokenizer, VOCAB)
    assert info.vocab_size == VOCAB and sorted(info.stop_token_ids) == [1, 106]
    assert tokenizer_info(tokenizer, VOCAB) is info  # built once per tokenizer and width
    decoded = info.decoded_vocab
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:1500].tolist()
    checked = 0
    for t in ids:
        if t in tokenizer.special_ids or t in tokenizer.byte_ids:
            continue
        assert decoded[t] == tokenizer.decode([t]).encode(), t
        checked += 1
    assert checked > 1200
    byte = tokenizer.token_to_id("<0x0A>")
    assert decoded[byte] == b"\n"
    # special tokens are never produced by a grammar; stop tokens end it
    assert set(tokenizer.special_ids - {1, 106}) <= set(info.special_token_ids)


def test_mask_matches_plain_torch_unpacking_and_spares_free_rows(tokenizer):
    from trt_gemma.guided import GrammarCompiler

    width = VOCAB + 64  # a logits width padded past the tokenizer: the pad ids must be masked
    compiler = GrammarCompiler(tokenizer_info(tokenizer, width))
    states = [GrammarState.start(compiler.compile(StructuredOutputsParams(json_object=True))),
              GrammarState.start(compiler.compile(StructuredOutputsParams(regex=r"[0-9]+x")))]
    states[1].accept(tokenizer.token_to_id("7"))
    logits = torch.randn(4, width, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    mask_logits(logits, [1, 3], states)
    bitmask = torch.zeros(2, (width + 31) // 32, dtype=torch.int32)
    for i, s in enumerate(states):
        s.matcher.fill_next_token_bitmask(bitmask, i)
    allowed = unpack_bitmask(bitmask, width)
    for i, row in enumerate([1, 3]):
        want = before[row].masked_fill(~allowed[i], float("-inf"))
        assert torch.equal(logits[row], want)
        assert not allowed[i, VOCAB:].any()
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    digits = {tokenizer.token_to_id(str(d)) for d in range(10)}
    assert digits <= set(allowed[1].nonzero().flatten().tolist())
    assert not allowed[0, tokenizer.token_to_id("7")]  # an object starts with "{" (or space)


def _check_json(out, schema):
    assert out.finish_reason == "stop", (out.finish_reason, out.text)
    value = json.loads(out.text)
    jsonschema.validate(value, schema)
    return value


def test_json_schemas_greedy_and_sampled_all_in_one_batch(engine):
    # every schema greedy with and without free whitespace; sampled in one of the two (a
    # sampled row costs a [vocab] noise draw per step)
    schedule = []
    for k, (name, schema) in enumerate(SCHEMAS.items()):
        for compact in (False, True):
            constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=compact)
            runs = SAMPLINGS if compact == bool(k % 2) else SAMPLINGS[:1]
            for temp, seed in runs:
                schedule.append((f"{name}-{compact}-{temp}-{seed}", "Answer in JSON:",
                                 _params(constraint, temp, seed)))
    outs = drain(engine, {0: schedule})
    for rid, _, _ in schedule:
        schema = SCHEMAS[rid.split("-")[0]]
        _check_json(outs[rid].outputs[0], schema)
        if "-True-" in rid:  # compact: no whitespace outside strings beyond ", " and ": "
            text = outs[rid].outputs[0].text
            assert "\n" not in text.replace('\\n', '')
    distinct = {outs[r].outputs[0].text for r, _, _ in schedule}
    assert len(distinct) > len(schedule) // 2  # the samples really differ


def test_json_object_regex_choice_and_grammar(engine):
    choices = ['say "yes"', "no\\way", "mañana", "日本"]
    cases = {
        "regex": (StructuredOutputsParams(regex=r"[A-Z][a-z]{1,6} [0-9]{2,4}(!|\?)"),
                  lambda t: re.fullmatch(r"[A-Z][a-z]{1,6} [0-9]{2,4}(!|\?)", t)),
        "choice": (StructuredOutputsParams(choice=choices), lambda t: t in choices),
        "grammar": (StructuredOutputsParams(grammar='root ::= "(" num ("," num){0,3} ")"\n'
                                                    'num ::= [1-9] [0-9]?'),
                    lambda t: re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?){0,3}\)", t)),
    }
    schedule = [(f"{name}-{temp}-{seed}", "Go:", _params(c, temp, seed, max_tokens=60))
                for name, (c, _) in cases.items() for temp, seed in SAMPLINGS]
    # any JSON object: greedy only (sampled, a random model writes an endless key)
    schedule.append(("object", "Go:", _params(StructuredOutputsParams(json_object=True),
                                              max_tokens=60)))
    outs = drain(engine, {0: schedule})
    for rid, _, _ in schedule[:-1]:
        out = outs[rid].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason in (1, 106), (rid, out)
        assert cases[rid.split("-")[0]][1](out.text), (rid, out.text)
    out = outs["object"].outputs[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)


def test_free_requests_in_the_same_steps_produce_what_they_produce_alone(model, tokenizer):
    free = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)]
    prompts = ["The weather today", "Once upon", "1, 2, 3,"]

    def run(with_constrained: bool):
        eng = LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=32 << 20))
        sched = [(f"free{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, free, strict=True))]
        if with_constrained:
            c = StructuredOutputsParams(json=SCHEMAS["bounded_numbers"])
            sched += [(f"c{i}", "JSON:", _params(c, t, s)) for i, (t, s) in enumerate(SAMPLINGS)]
        return drain(eng, {0: sched})

    alone, mixed = run(False), run(True)
    for i in range(len(free)):
        assert mixed[f"free{i}"].outputs[0].token_ids == alone[f"free{i}"].outputs[0].token_ids
    for i in range(len(SAMPLINGS)):
        _check_json(mixed[f"c{i}"].outputs[0], SCHEMAS["bounded_numbers"])


def test_n_samples_each_follow_the_grammar(engine):
    c = StructuredOutputsParams(json=SCHEMAS["nested"], disable_any_whitespace=True)
    out = drain(engine, {0: [("n", "JSON:", _params(c, 1.0, 7, n=3))]})["n"]
    assert len(out.outputs) == 3
    for o in out.outputs:
        _check_json(o, SCHEMAS["nested"])
    assert len({o.text for o in out.outputs}) > 1


def test_preemption_keeps_the_grammar_state(model, tokenizer):
    eng = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=24, block_size=4,
                                                   max_num_seqs=8, enable_prefix_caching=False))
    c = StructuredOutputsParams(json=SCHEMAS["nested"], disable_any_whitespace=True)
    sched = [(f"r{i}", f"Write JSON now, {word}:", _params(c, max_tokens=80))
             for i, word in enumerate(["please", "quickly", "then", "ok", "now"])]
    outs = drain(eng, {0: sched})
    assert eng.scheduler.num_preemptions > 0
    for rid, _, _ in sched:
        _check_json(outs[rid].outputs[0], SCHEMAS["nested"])


def test_stop_strings_min_tokens_and_ignore_eos_with_a_grammar(engine):
    choice = StructuredOutputsParams(choice=["alpha beta"])
    outs = drain(engine, {0: [
        ("stop", "x", _params(choice, stop=[" beta"])),
        # the grammar is done after "alpha beta": it wins over min_tokens and ignore_eos
        ("min", "x", _params(choice, min_tokens=50, max_tokens=60)),
        ("eos", "x", _params(choice, ignore_eos=True)),
    ]})
    stopped = outs["stop"].outputs[0]
    assert stopped.text == "alpha" and stopped.stop_reason == " beta"
    for rid in ("min", "eos"):
        out = outs[rid].outputs[0]
        assert out.text == "alpha beta" and out.finish_reason == "stop", (rid, out)
        assert out.stop_reason in (1, 106) and out.token_ids[-1] == out.stop_reason


def test_min_tokens_still_holds_eos_where_the_grammar_allows_more(engine):
    # a run of digits can stop anywhere: min_tokens keeps it going
    c = StructuredOutputsParams(regex=r"[0-9]+")
    out = drain(engine, {0: [("d", "n:", _params(c, 1.0, 3, min_tokens=20, max_tokens=30))]})
    out = out["d"].outputs[0]
    assert out.text.isdigit() and len(out.token_ids) >= 20


@pytest.mark.parametrize("constraint, words", [
    (dict(json={"type": "objekt"}), ["structured_outputs.json", "objekt"]),
    (dict(json='{"type": "object",'), ["structured_outputs.json", "not valid JSON"]),
    (dict(json={"$ref": "#/defs/missing"}), ["structured_outputs.json", "defs"]),
    (dict(json="[1, 2]"), ["structured_outputs.json", "must be a JSON object"]),
    (dict(regex="[a-"), ["structured_outputs.regex", "Unclosed '['"]),
    (dict(regex="(?<=x)a"), ["structured_outputs.regex", "Lookbehind"]),
    (dict(grammar='root ::= x'), ["structured_outputs.grammar", 'Rule "x" is not defined']),
    (dict(grammar='rot ::= "a"'), ["structured_outputs.grammar", '"root" is not found']),
])
def test_bad_constraints_raise_grammar_error_naming_the_problem(engine, constraint, words):
    params = _params(StructuredOutputsParams(**constraint))
    for call in (lambda: engine.check_structured_outputs(params.structured_outputs),
                 lambda: engine.make_request("bad", "x", params),
                 lambda: engine.add_request("bad", "x", params)):
        with pytest.raises(GrammarError) as err:
            call()
        for w in words:
            assert w in str(err.value)
        assert "/project/" not in str(err.value) and not str(err.value).startswith("[")
    assert "bad" not in engine.requests and not engine.scheduler.waiting


def test_a_repeated_schema_is_compiled_once(model, tokenizer):
    eng = LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=16 << 20))
    schema = SCHEMAS["bounded_numbers"]
    eng.check_structured_outputs(StructuredOutputsParams(json=schema))
    compiler = eng._grammars
    assert compiler.num_compiled == 1
    # the same schema as text with other spacing, and again through requests
    eng.check_structured_outputs(StructuredOutputsParams(json=json.dumps(schema, indent=4)))
    drain(eng, {0: [(f"r{i}", "x", _params(StructuredOutputsParams(json=schema), max_tokens=5))
                    for i in range(3)]})
    assert compiler.num_compiled == 1
    # other options or another schema are other grammars
    eng.check_structured_outputs(StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    eng.check_structured_outputs(StructuredOutputsParams(json=SCHEMAS["nested"]))
    assert compiler.num_compiled == 3


def test_a_token_the_grammar_forbids_fails_loudly(model, tokenizer, monkeypatch):
    import trt_gemma.runtime.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "mask_logits", lambda *a: None)  # the mask "forgotten"
    eng = LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=16 << 20))
    eng.add_request("r", "x", _params(StructuredOutputsParams(regex="[0-9]{8}"), 1.0, 0))
    with pytest.raises(GrammarViolation, match="does not allow"):
        for _ in range(10):
            eng.step()


def test_logprobs_are_raw_by_default_processed_on_request(model, tokenizer):
    c = StructuredOutputsParams(regex="[0-9]{4}")
    params = _params(c, 0.0, max_tokens=4, logprobs=3)
    raw = drain(LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=16 << 20)),
                {0: [("r", "x", params)]})["r"].outputs[0]
    processed = drain(LLMEngine(model, tokenizer, EngineConfig(
        kv_cache_memory=16 << 20, logprobs_mode="processed_logprobs")),
        {0: [("r", "x", params)]})["r"].outputs[0]
    assert raw.token_ids == processed.token_ids and raw.text.isdigit()
    # Processed: the digits (as pieces or bytes) are the only tokens left, so the greedy one
    # ranks first; raw: it is one of 262144 tokens, rarely the top.
    digits = {tokenizer.token_to_id(t) for d in range(10) for t in (str(d), f"<0x3{d}>")}
    for r, p, t in zip(raw.logprobs, processed.logprobs, raw.token_ids, strict=True):
        assert p[t].rank == 1 and p[t].logprob > -3.0  # the top one of 20: >= log(1/20)
        assert r[t].logprob < p[t].logprob
        assert set(p) <= digits and len(p) == 3  # the processed top 3 are digits too
        assert not set(r) <= digits  # the raw top 3 are not all digits
    assert any(r[t].rank > 1 for r, t in zip(raw.logprobs, raw.token_ids, strict=True))


@pytest.mark.slow
def test_real_gemma3_270m_json_schema(real_llm_fp32):
    schema = {"type": "object",
              "properties": {"city": {"type": "string", "maxLength": 40},
                             "country": {"type": "string", "maxLength": 40},
                             "population_millions": {"type": "number", "minimum": 0,
                                                     "maximum": 100},
                             "landmarks": {"type": "array", "items": {"type": "string",
                                                                      "maxLength": 40},
                                           "maxItems": 3}},
              "required": ["city", "country", "population_millions", "landmarks"]}
    prompt = real_llm_fp32.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe Paris as JSON."}])
    outs = real_llm_fp32.generate([prompt] * 2, [
        SamplingParams(temperature=0.0, max_tokens=200,
                       structured_outputs=StructuredOutputsParams(json=schema)),
        SamplingParams(temperature=1.0, seed=0, max_tokens=200,
                       structured_outputs=StructuredOutputsParams(json=schema))])
    for out in outs:
        _check_json(out.outputs[0], schema)


def test_bounded_json_strings_refuse_raw_control_characters(tokenizer):
    """xgrammar 0.2.9 lets raw U+0000-U+001F into strings with minLength/maxLength (invalid
    JSON); the compiler closes that hole."""
    import xgrammar as xgr

    from trt_gemma.guided import GrammarCompiler

    compiler = GrammarCompiler(tokenizer_info(tokenizer, VOCAB))
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}},
              "required": ["s"]}
    compiled = compiler.compile(StructuredOutputsParams(json=schema, disable_any_whitespace=True))

    def accepts(text: str) -> bool:
        m = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        return m.accept_string(text) and m.is_completed()

    for good in ('{"s": "ab"}', '{"s": "日本b!"}', '{"s": ""}'):
        assert accepts(good), good
        jsonschema.validate(json.loads(good), schema)
    for bad in ('{"s": "a\tb"}', '{"s": "a\x02"}', '{"s": "a\x1f"}', '{"s": "abcde"}'):
        assert not accepts(bad), bad


def test_strict_json_schemas_forbid_unnamed_properties(tokenizer):
    import xgrammar as xgr

    from trt_gemma.guided import GrammarCompiler

    compiler = GrammarCompiler(tokenizer_info(tokenizer, VOCAB))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    def accepts(text: str, **options) -> bool:
        compiled = compiler.compile(StructuredOutputsParams(json=schema, **options))
        m = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        return m.accept_string(text) and m.is_completed()

    extra = '{"a": 1, "b": "x"}'
    jsonschema.validate(json.loads(extra), schema)  # valid JSON Schema either way
    assert accepts('{"a": 1}') and not accepts(extra)
    assert accepts('{"a": 1}', strict=False) and accepts(extra, strict=False)
    assert accepts('{ "a" :\n 1 }') and not accepts('{ "a" :\n 1 }', disable_any_whitespace=True)


def test_bench_guided_measures_every_mode_on_one_engine(engine):
    from trt_gemma.bench import guided as bench

    results = bench.measure(engine, num_prompts=2, max_tokens=6, rounds=1)
    assert engine.greedy_head is not None  # CPU, a 262144-token vocabulary
    assert set(results) == {*bench.MODES, bench.FULL_HEAD, "tokenizer_info_s"}
    assert engine.greedy_head_max_rows > 0  # restored after the full-head mode
    for mode in (*bench.MODES, bench.FULL_HEAD):
        r = results[mode]
        (run,) = r["rounds"]
        assert 2 <= run["output_tokens"] <= 12 and r["output_tokens_per_s"] > 0
        assert ("vs_none" in r) == (mode != "none")
        assert ("compile_s" in r) == (mode in bench.MODES[1:])
    good = {"name": "Oslo", "country": "Norway", "population_millions": 0.7, "kind": "city",
            "landmarks": [], "location": {"lat": 59.9, "lon": 10.7}}
    texts = [json.dumps(good), json.dumps({**good, "kind": "metropolis"}), "{not json"]
    assert bench.check("json_schema", texts) == {"json_objects": 2, "schema_valid": 1}
    assert engine.block_manager.all_free() and not engine.requests
