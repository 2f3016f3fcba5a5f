"""The offline API's vLLM-shaped surface: LLM(model=...), device="auto", LLM.chat, and sampling
defaults from generation_config.json (read from an HF dir, recorded in an engine dir at build).

On the tiny random Gemma 3 with a character tokenizer (seconds). References: the chat prompt is
checked against the text of Gemma's official chat template, and the defaults against the JSON
file written by the test.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from trt_gemma import LLM, SamplingParams
from trt_gemma.checkpoint.generation import parse_generation_config, read_generation_config
from trt_gemma.engine_dir import generation_defaults, read_engine
from trt_gemma.errors import CheckpointError, ConfigError
from trt_gemma.llm import resolve_device

GENERATION = {"do_sample": True, "top_k": 64, "top_p": 0.95, "temperature": 0.8,
              "repetition_penalty": 1.05, "min_p": 0.01, "max_length": 32768,
              "bos_token_id": 2, "eos_token_id": [1, 106], "cache_implementation": "hybrid"}
DEFAULTS = {"top_k": 64, "top_p": 0.95, "temperature": 0.8, "repetition_penalty": 1.05,
            "min_p": 0.01}


@pytest.fixture(scope="module")
def tiny_with_generation(tiny_gemma3_dir, tmp_path_factory):
    source = tmp_path_factory.mktemp("gen") / "ckpt"
    shutil.copytree(tiny_gemma3_dir, source)
    (source / "generation_config.json").write_text(json.dumps(GENERATION))
    return source


@pytest.fixture(scope="module")
def llm(tiny_with_generation):
    return LLM(model=str(tiny_with_generation), dtype="float32", device="cpu")


def test_generation_config_keys_vllm_reads():
    assert parse_generation_config(GENERATION) == DEFAULTS
    assert parse_generation_config({"top_k": -1, "max_new_tokens": 100}) == {"top_k": 0}
    assert parse_generation_config({"do_sample": False}) == {}
    for bad in ({"top_p": 0}, {"top_p": 1.5}, {"temperature": -1}, {"top_k": 2.5},
                {"top_k": True}, {"repetition_penalty": "1.1"}, {"min_p": float("nan")}):
        with pytest.raises(CheckpointError, match=next(iter(bad))):
            parse_generation_config(bad, "gc.json")


def test_generation_defaults_per_source(tiny_with_generation, tiny_gemma3_dir, tmp_path):
    assert read_generation_config(tiny_with_generation) == DEFAULTS
    assert generation_defaults(tiny_with_generation) == DEFAULTS
    assert generation_defaults(tiny_gemma3_dir) == {}  # no file: OpenAI's defaults apply
    assert generation_defaults("gemma3-270m") == {}  # a GGUF has no generation config
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gemma3_dir, broken)
    (broken / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        LLM(model=str(broken), device="cpu")


def test_llm_model_alias_and_device_auto(llm, tiny_with_generation, monkeypatch):
    assert llm.device == torch.device("cpu")
    with pytest.raises(ConfigError, match="two models"):
        LLM(str(tiny_with_generation), model="gemma3-270m")
    with pytest.raises(ConfigError, match="name the model"):
        LLM()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    import inspect

    assert inspect.signature(LLM).parameters["device"].default == "auto"


def test_default_sampling_params_come_from_generation_config(llm, tiny_with_generation):
    assert llm.get_default_sampling_params() == SamplingParams(**DEFAULTS)
    # generate() without params samples with them: two fresh engines (same engine seed) draw
    # the same tokens with no params as with the defaults passed explicitly
    prompts = ["abc", "hello"]
    fresh = [LLM(model=str(tiny_with_generation), dtype="float32", device="cpu")
             for _ in range(2)]
    implicit = [o.outputs[0].token_ids for o in fresh[0].generate(prompts)]
    explicit = [o.outputs[0].token_ids
                for o in fresh[1].generate(prompts, SamplingParams(**DEFAULTS))]
    assert implicit == explicit and all(len(t) == 16 for t in implicit)


def test_chat_renders_gemmas_template_and_matches_generate(llm):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"}]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = llm.chat(messages, greedy)
    # Gemma's official template: the system message folded into the first user turn
    official = ("<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n"
                "<start_of_turn>model\n")
    assert out[0].prompt == official
    ref = llm.generate(official, greedy)
    assert out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    # several conversations at once, in order
    two = llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                   greedy)
    assert [o.prompt for o in two] == [
        "<start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_turn>user\nb<end_of_turn>\n<start_of_turn>model\n"]
    from trt_gemma.errors import RequestError

    with pytest.raises(RequestError, match="LLM.chat"):
        llm.chat([{"role": "wizard", "content": "x"}], greedy)
    with pytest.raises(RequestError, match="no messages"):
        llm.chat([], greedy)


def test_build_records_generation_config_in_the_engine(tiny_with_generation, tmp_path):
    from trt_gemma.converter.engine import BuildOptions, build_engine

    out = tmp_path / "engine"
    build_engine(tiny_with_generation, out, BuildOptions(quant="none", dtype="float32"),
                 progress=False, log=lambda _: None)
    engine = read_engine(out)
    assert engine.metadata["generation_config"] == DEFAULTS
    assert engine.generation_config == DEFAULTS == generation_defaults(out)
    llm = LLM(model=str(out), device="cpu")
    assert llm.get_default_sampling_params() == SamplingParams(**DEFAULTS)
