"""``bench throughput --peer URL`` and ``bench latency --peer URL``: our own server on the tiny
checkpoint as the peer of a run on the same checkpoint, and an unreachable URL refused before our
run starts.

The independent references: the token counts we asked for (num_requests * output_len, greedy
with ignore_eos), the server's own ``usage``, and the two sides' figures as written to the JSON
(every ratio is recomputed from them). Every wait is bounded: the server's startup, each request
(--peer-timeout) and the process's shutdown.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_process import free_port, running_server  # noqa: E402

from trt_gemma.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STARTUP_TIMEOUT_S = 120
KEY = "peer-secret-key"  # the server requires it: the peer must send it, and never record it


@pytest.fixture(scope="module")
def server(tiny_gemma3_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("peer") / "serve.log"
    args = ["--max-num-seqs", "4", "--log-level", "warning", "--shutdown-timeout", "5",
            "--api-key", KEY]
    with running_server(str(tiny_gemma3_dir), args, log, threads=1,
                        startup_timeout_s=STARTUP_TIMEOUT_S) as (url, _):
        yield url


def test_our_server_as_url_peer(server, tiny_gemma3_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    n, input_len, output_len = 4, 8, 6
    rc = main(["bench", "throughput", str(tiny_gemma3_dir), "--num-requests", str(n),
               "--input-len", str(input_len), "--output-len", str(output_len),
               "--peer", server + "/", "--peer-timeout", "120", "--peer-api-key", KEY,
               "--output-json", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert KEY not in out.read_text()
    report = json.loads(out.read_text())
    ours = report["results"]
    peer = report["peers"][server + "/"]
    assert peer["url"] == server
    assert [m["id"] for m in peer["models"]] and peer["model"] == peer["models"][0]["id"]
    theirs = peer["results"]
    # what we asked for == what the server reported == what was streamed
    assert theirs["output_tokens"] == n * output_len == theirs["requested_output_tokens"]
    assert theirs["usage_output_tokens"] == n * output_len == theirs["streamed_output_tokens"]
    assert theirs["requests_with_usage"] == n and theirs["token_counts_agree"] is True
    assert theirs["usage_prompt_tokens"] == theirs["input_tokens"] == ours["input_tokens"]
    assert theirs["num_requests"] == n
    elapsed = theirs["elapsed_s"]
    assert theirs["requests_per_s"] == pytest.approx(n / elapsed)
    assert theirs["output_tokens_per_s"] == pytest.approx(n * output_len / elapsed)
    assert theirs["total_tokens_per_s"] == pytest.approx(n * (input_len + output_len) / elapsed)
    lat = theirs["latency_s"]
    assert 0 < lat["p50"] <= lat["p99"] <= elapsed
    assert 0 < theirs["ttft_s"]["mean"] <= lat["mean"]
    cmp = peer["comparison"]
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        assert cmp[key]["trt_gemma"] == ours[key] and cmp[key]["peer"] == theirs[key]
        assert cmp[key]["speedup"] == pytest.approx(ours[key] / theirs[key])
    for stat in ("mean", "p50", "p99"):
        assert cmp[f"latency_{stat}_s"]["speedup"] == pytest.approx(
            theirs["latency_s"][stat] / ours["latency_s"][stat])
    assert f"vs {server}/:" in capsys.readouterr().out


def test_latency_with_our_server_as_url_peer(server, tiny_gemma3_dir, tmp_path, capsys):
    out = tmp_path / "l.json"
    rc = main(["bench", "latency", str(tiny_gemma3_dir), "--batch-sizes", "1,2",
               "--input-len", "6", "--output-len", "5", "--iterations", "1", "--peer", server,
               "--peer-api-key", KEY, "--peer-timeout", "120", "--output-json", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    peer = report["peers"][server]
    assert peer["url"] == server
    for b in (1, 2):
        theirs, cmp = peer[str(b)]["results"], peer[str(b)]["comparison"]
        assert theirs["output_tokens"] == b * 5  # greedy, ignore_eos: exactly what was asked
        assert 0 < theirs["ttft_s"] < theirs["request_latency_s"]
        assert theirs["per_token_s"] > 0
        ours = report["results"][str(b)]
        assert cmp["ttft_s"]["speedup"] == pytest.approx(theirs["ttft_s"] / ours["ttft_s"]["mean"])
        assert cmp["per_token_s"]["speedup"] == pytest.approx(
            theirs["per_token_s"] / ours["per_token_s"]["mean"])


def test_unreachable_url_refused_before_our_run(tiny_gemma3_dir, tmp_path, capsys, monkeypatch):
    from trt_gemma.bench import target

    def no_load(*args, **kwargs):
        raise AssertionError("our run started before the peer was probed")

    monkeypatch.setattr(target, "load_target", no_load)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "x.json"
    rc = main(["bench", "throughput", str(tiny_gemma3_dir), "--peer", url,
               "--output-json", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trt-gemma: error:"), err
    assert f"cannot reach {url}" in err[0]
    assert not out.exists()


def test_peer_without_its_api_key_is_refused_before_our_run(server, tiny_gemma3_dir, tmp_path,
                                                           capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "x.json"
    rc = main(["bench", "throughput", str(tiny_gemma3_dir), "--peer", server,
               "--output-json", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "answered HTTP 401" in err[0], err
    assert not out.exists()


def test_peer_model_must_be_served(server, tiny_gemma3_dir, tmp_path, capsys):
    out = tmp_path / "x.json"
    rc = main(["bench", "throughput", str(tiny_gemma3_dir), "--peer", server,
               "--peer-api-key", KEY, "--peer-model", "no-such-model",
               "--output-json", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'no-such-model' is not served by" in err[0], err
    assert not out.exists()
