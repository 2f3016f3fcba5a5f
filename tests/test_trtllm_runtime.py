"""The TensorRT-LLM runtime backend: `LLM(ENGINE_DIR)` and `trt-gemma serve ENGINE_DIR` driving a
TensorRT engine through TensorRT-LLM's LLM API.

No real TensorRT engine has run here: TensorRT-LLM needs an NVIDIA GPU and cannot be installed on
this machine. The adapter is driven through tests/fake_tensorrt_llm, a recorded-contract fake of
the few TensorRT-LLM names it calls (each with the signature and documented behaviour read in
NVIDIA/TensorRT-LLM's source, written down in the fake's docstrings). The fake generates tokens
by a tiny rule (it repeats the prompt after BOS), so the expected text, stop strings, lengths and
finish reasons are computed here independently, from the rule and plain string operations. The
server is checked with the official `openai` client. The export is the real one `trt-gemma
build --backend tensorrt-llm` writes for a tiny random Gemma 3; "running trtllm-build" is
simulated by writing the engine directory's config.json and an empty-shaped rank0.engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from trt_gemma import LLM, SamplingParams, cli
from trt_gemma.converter import trtllm
from trt_gemma.converter.engine import BuildOptions, build_engine
from trt_gemma.errors import CheckpointError, ConfigError
from trt_gemma.sampling_params import StructuredOutputsParams
from trt_gemma.tokenizer import GemmaTokenizer

FAKE = Path(__file__).parent / "fake_tensorrt_llm"
MAX_SEQ_LEN, MAX_BATCH = 64, 8

pytestmark = pytest.mark.usefixtures("one_thread")


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(tiny_gemma3_dir, tmp_path_factory):
    """The export of the tiny Gemma 3 (trtllm-build absent: only the checkpoint is written)."""
    out = tmp_path_factory.mktemp("trtllm") / "export"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trtllm, "trtllm_available", lambda: False)
        build_engine(tiny_gemma3_dir, out, BuildOptions(quant="none", backend="tensorrt-llm",
                                                        dtype="bfloat16"),
                     progress=False, log=lambda m: None)
    return out


def simulate_trtllm_build(export: Path, architecture: str | None = None) -> Path:
    """What trtllm-build leaves in <export>/trtllm_engine: config.json (pretrained_config,
    build_config) and rank0.engine."""
    engine = export / trtllm.ENGINE_DIR
    engine.mkdir()
    pretrained = json.loads((export / trtllm.CHECKPOINT_DIR / "config.json").read_text())
    if architecture is not None:
        pretrained["architecture"] = architecture
    build = {"max_input_len": MAX_SEQ_LEN - 1, "max_seq_len": MAX_SEQ_LEN,
             "max_batch_size": MAX_BATCH, "max_beam_width": 1, "max_num_tokens": 256}
    (engine / "config.json").write_text(json.dumps(
        {"version": "1.1.0", "pretrained_config": pretrained, "build_config": build}))
    (engine / "rank0.engine").write_bytes(b"\0" * 64)
    return engine


@pytest.fixture
def built(export_dir, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(export_dir, export)
    simulate_trtllm_build(export)
    return export


def _drop_tensorrt_llm_modules() -> None:
    for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture
def fake(monkeypatch):
    """``import tensorrt_llm`` finds the fake for this test; its call record starts empty."""
    _drop_tensorrt_llm_modules()
    monkeypatch.syspath_prepend(str(FAKE))
    import tensorrt_llm._fake as fake_module

    fake_module.reset()
    yield fake_module
    _drop_tensorrt_llm_modules()


@pytest.fixture
def tokenizer(export_dir):
    return GemmaTokenizer.load(export_dir / trtllm.TOKENIZER_DIR)


def echo_ids(prompt_ids: list[int], count: int) -> list[int]:
    """The fake's rule, written independently: the prompt after BOS, repeated."""
    body = prompt_ids[1:]
    return [body[i % len(body)] for i in range(count)]


def echo_text(prompt: str, count: int) -> str:
    """For a character tokenizer: the prompt's characters, repeated."""
    return "".join(prompt[i % len(prompt)] for i in range(count))


# -- detection and the settings TensorRT-LLM is given -------------------------------------------

def test_export_settings_reach_tensorrt_llm(built, fake, tiny_gemma3_dir, tokenizer):
    hf = json.loads((tiny_gemma3_dir / "config.json").read_text())
    # reference: the HF config's layer types; a full layer sees the whole sequence of this run
    windows = [hf["sliding_window"] if t == "sliding_attention" else MAX_SEQ_LEN
               for t in hf["layer_types"]]
    assert hf["sliding_window"] < MAX_SEQ_LEN and MAX_SEQ_LEN in windows
    for source in (built, built / trtllm.ENGINE_DIR):  # the export, or its engine dir named
        fake.reset()
        llm = LLM(str(source), kv_cache_memory=1 << 20)
        (init,) = fake.calls("LLM.__init__")
        assert init["model"] == str(built / trtllm.ENGINE_DIR)
        assert init["skip_tokenizer_init"] is True and init["tensor_parallel_size"] == 1
        assert init["max_batch_size"] == MAX_BATCH  # our default capped at the engine's
        assert init["max_seq_len"] == MAX_SEQ_LEN
        (kv,) = fake.calls("KvCacheConfig")
        assert kv["max_attention_window"] == windows
        assert kv["sink_token_length"] == 0 and kv["enable_block_reuse"] is True
        per_token = 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * hf["head_dim"] * 2
        assert kv["max_tokens"] == (1 << 20) // per_token
        assert not fake.calls("TorchLLM.__init__")  # the TensorRT-engine class, not PyTorch's
        llm.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0))
        sp = fake.calls("LLM.generate_async")[0]["sampling_params"]
        assert (sp.end_id, sp.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)
        others = sorted(tokenizer.stop_token_ids - {tokenizer.eos_id})
        assert sp.stop_token_ids == (others or None)
        assert sp.top_k == 1 and sp.detokenize is False and sp.include_stop_str_in_output
        llm.trtllm.shutdown()
        assert fake.calls("LLM.shutdown")


def test_sampling_fields_mapped(built, fake):
    llm = LLM(str(built))
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, seed=11,
                            repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5,
                            min_tokens=2, max_tokens=5, stop_token_ids=[40], n=2)
    (out,) = llm.generate([2, 30, 31, 32], params)
    sp = fake.calls("LLM.generate_async")[0]["sampling_params"]
    expected = dict(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, seed=11,
                    repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5,
                    min_tokens=2, max_tokens=5, n=2)
    assert {k: getattr(sp, k) for k in expected} == expected
    assert 40 in sp.stop_token_ids
    assert [o.token_ids for o in out.outputs] == [echo_ids([2, 30, 31, 32], 5)] * 2
    assert [o.finish_reason for o in out.outputs] == ["length", "length"]


def test_what_cannot_be_mapped_is_refused(built, fake):
    llm = LLM(str(built))
    cases = [(SamplingParams(logprobs=1), "logprobs"),
             (SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")),
              "structured_outputs"),
             (SamplingParams(n=2, temperature=0), "SamplingParams.n")]
    for params, field in cases:
        with pytest.raises(ConfigError, match=field):
            llm.generate("hi", params)
    assert not fake.calls("LLM.generate_async")
    with pytest.raises(ConfigError, match="not supported by the TensorRT-LLM backend"):
        llm.trtllm.check_structured_outputs(StructuredOutputsParams(json_object=True))
    for bad, match in (({"enforce_eager": True}, "enforce_eager"),
                       ({"max_model_len": MAX_SEQ_LEN + 1}, "max_seq_len"),
                       ({"kv_cache_dtype": "fp8"}, "trtllm-build")):
        with pytest.raises(ConfigError, match=match):
            LLM(str(built), **bad)
    with pytest.raises(ConfigError, match="dtype"):
        LLM(str(built), dtype="float32")


# -- the request lifecycle ----------------------------------------------------------------------

def test_generate_length_stop_string_and_eos(built, fake, tokenizer):
    llm = LLM(str(built))
    prompt = "hello world. "
    length, stop, eos = llm.generate(
        [prompt, prompt, "ab<eos>cd"],
        [SamplingParams(max_tokens=17, temperature=0),
         SamplingParams(max_tokens=40, temperature=0, stop=["d. he"]),
         SamplingParams(max_tokens=10, temperature=0)])
    ids = tokenizer.encode(prompt)
    assert length.outputs[0].text == echo_text(prompt, 17)
    assert length.outputs[0].token_ids == echo_ids(ids, 17)
    assert length.outputs[0].finish_reason == "length" and length.finished
    # the stop string spans tokens; the text ends before it and TensorRT-LLM is told to stop
    full = echo_text(prompt, 40)
    assert stop.outputs[0].text == full[:full.index("d. he")]
    assert (stop.outputs[0].finish_reason, stop.outputs[0].stop_reason) == ("stop", "d. he")
    assert len(fake.calls("RequestOutput.abort")) == 1
    # <eos> is the engine's end_id: TensorRT-LLM ends on it without returning it; we report it
    # as the native engine does (the last generated token, not in the text)
    assert eos.outputs[0].text == "ab"
    assert eos.outputs[0].token_ids == [*tokenizer.encode("ab", add_bos=False), tokenizer.eos_id]
    assert (eos.outputs[0].finish_reason, eos.outputs[0].stop_reason) == ("stop",
                                                                          tokenizer.eos_id)


def test_max_tokens_capped_by_the_context(built, fake, tokenizer):
    """TensorRT-LLM refuses prompt + max_tokens > max_seq_len; we cap max_tokens, as our engine
    ends such a sequence with 'length' when the context is full."""
    llm = LLM(str(built))
    prompt = "0123456789"
    (out,) = llm.generate(prompt, SamplingParams(max_tokens=500, temperature=0))
    room = MAX_SEQ_LEN - len(tokenizer.encode(prompt))
    assert fake.calls("LLM.generate_async")[0]["sampling_params"].max_tokens == room
    assert out.outputs[0].text == echo_text(prompt, room)
    assert out.outputs[0].finish_reason == "length"


def test_stream_pieces_and_chat(built, fake):
    llm = LLM(str(built))
    pieces = list(llm.stream("abcdef", SamplingParams(max_tokens=9, temperature=0,
                                                      stop=["fab"])))
    assert len(pieces) > 1 and "".join(pieces) == "abcde"
    (reply,) = llm.chat([{"role": "user", "content": "hi"}],
                        SamplingParams(max_tokens=6, temperature=0))
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert reply.outputs[0].text == llm.tokenizer.decode(
        echo_ids(llm.tokenizer.encode(rendered), 6))


def test_abort_and_engine_error(built, fake):
    llm = LLM(str(built))
    engine = llm.trtllm

    async def abort_after_two() -> list:
        seen = []
        async for out in engine.generate([2, 10, 11, 12], SamplingParams(max_tokens=40,
                                                                           temperature=0), "r1"):
            seen.append(out)
            if len(out.outputs[0].token_ids) >= 2:
                break
        return seen

    seen = asyncio.run(abort_after_two())
    assert fake.calls("RequestOutput.abort") and not seen[-1].finished
    assert engine.get_stats().num_running == 0

    fake.FAIL_AT = 3
    with pytest.raises(RuntimeError, match="fake executor error"):
        llm.generate("abc", SamplingParams(max_tokens=10, temperature=0))
    fake.FAIL_AT = None
    (ok,) = llm.generate("abc", SamplingParams(max_tokens=4, temperature=0))
    assert ok.outputs[0].text == "abca"


# -- the server -------------------------------------------------------------------------------

def test_server_through_openai_client(built, fake, tokenizer):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from server_process import threaded_server

    from trt_gemma.server.app import create_app
    from trt_gemma.server.engine_client import EngineClient

    client = EngineClient.from_source(str(built), max_queue=8)
    with threaded_server(create_app(client, "trt")) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20)
        prompt = "hello world. "
        done = sdk.completions.create(model="trt", prompt=prompt, max_tokens=12, temperature=0)
        assert done.choices[0].text == echo_text(prompt, 12)
        assert done.choices[0].finish_reason == "length"
        assert done.usage.completion_tokens == 12
        assert done.usage.prompt_tokens == len(tokenizer.encode(prompt))
        metrics = httpx.get(f"{url}/metrics").text
        assert _sample(metrics, "trt_gemma_generation_tokens_total") == 12
        assert _sample(metrics, "trt_gemma_prompt_tokens_total") == done.usage.prompt_tokens

        chunks = list(sdk.completions.create(model="trt", prompt=prompt, max_tokens=40,
                                             temperature=0, stop=["d. "], stream=True))
        assert "".join(c.choices[0].text for c in chunks) == "hello worl"
        assert chunks[-1].choices[0].finish_reason == "stop"

        messages = [{"role": "user", "content": "hi"}]
        chat = list(sdk.chat.completions.create(model="trt", messages=messages, max_tokens=5,
                                                temperature=0, stream=True))
        rendered = tokenizer.apply_chat_template(messages)
        expected = tokenizer.decode(echo_ids(tokenizer.encode(rendered), 5))
        assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chat if c.choices][-1] == "length"

        with pytest.raises(openai.BadRequestError, match="logprobs"):
            sdk.completions.create(model="trt", prompt="x", max_tokens=2, logprobs=1)

        # a client that goes away mid-stream: the request is aborted in TensorRT-LLM
        fake.TICK_S = 0.02
        aborts = len(fake.calls("RequestOutput.abort"))
        body = {"model": "trt", "prompt": prompt, "max_tokens": 50, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=20) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 10
        while len(fake.calls("RequestOutput.abort")) == aborts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(fake.calls("RequestOutput.abort")) == aborts + 1
        fake.TICK_S = 0.002

        # an executor error: an OpenAI-style 500, and the server goes on serving
        fake.FAIL_AT = 2
        with pytest.raises(openai.InternalServerError):
            sdk.completions.create(model="trt", prompt="abc", max_tokens=5)
        fake.FAIL_AT = None
        # a new connection: the server closes the one a 500 went out on
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20)
        again = sdk.completions.create(model="trt", prompt="abc", max_tokens=5, temperature=0)
        assert again.choices[0].text == "abcab"
        assert httpx.get(f"{url}/health").status_code == 200
    assert fake.calls("LLM.shutdown")  # the app's shutdown stops TensorRT-LLM


def _sample(metrics: str, name: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


# -- what cannot be served ---------------------------------------------------------------------

def test_unbuilt_export_names_the_build_command(export_dir, fake, capsys):
    with pytest.raises(CheckpointError, match="never built.*trtllm-build --checkpoint_dir"):
        LLM(str(export_dir))
    assert cli.main(["generate", str(export_dir), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trtllm-build" in err
    assert not fake.calls("LLM.__init__")


def test_bare_engine_dirs(export_dir, tmp_path, fake):
    """A bare Gemma 3 engine (no export record) would lose its windows: refused. A Gemma 1
    engine (every layer global) runs, its tokenizer found in a sibling directory."""
    bare = tmp_path / "bare"
    shutil.copytree(export_dir, bare)
    engine = simulate_trtllm_build(bare)
    (bare / trtllm.EXPORT_JSON).unlink()
    with pytest.raises(CheckpointError, match="attention windows are unknown"):
        LLM(str(engine))
    gemma1 = tmp_path / "g1"
    shutil.copytree(export_dir, gemma1)
    (gemma1 / trtllm.EXPORT_JSON).unlink()
    engine = simulate_trtllm_build(gemma1, architecture="GemmaForCausalLM")
    llm = LLM(str(engine))
    assert fake.calls("KvCacheConfig")[0]["max_attention_window"] is None
    (out,) = llm.generate("xyz", SamplingParams(max_tokens=4, temperature=0))
    assert out.outputs[0].text == "xyzx"


def test_without_tensorrt_llm_one_line_exit_2_nothing_written(built, tmp_path):
    """The real CLI in a subprocess where tensorrt_llm cannot be imported."""
    assert not any(p for p in sys.path if "fake_tensorrt_llm" in p)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in built.rglob("*")}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "trt_gemma.cli", "serve", str(built),
                           "--port", "0"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(built) in lines[0] and "pip install tensorrt_llm --extra-index-url " \
        "https://pypi.nvidia.com" in lines[0]
    assert proc.stdout == ""
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in built.rglob("*")} == before
    assert not any(cwd.iterdir())


def test_missing_tensorrt_llm_in_process(built, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails: not installed
    assert cli.main(["generate", str(built), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install tensorrt_llm" in err
