"""`trt-gemma bench serve` against our own server on a tiny model, and against a fake that dies.

Our server runs as a subprocess (`trt-gemma serve` on the tiny random Gemma 3 checkpoint of
conftest.py) on a free loopback port; the independent reference for every token count is what we
asked for (num_prompts * output_len with ignore_eos) and the server's own `usage`. The fake server
(stdlib http.server in a thread) streams a fixed reply and, after K completions, drops every
connection: a server gone mid-sweep. Every wait is bounded in time and every sweep in requests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_process import free_port, running_server  # noqa: E402

from trt_gemma.cli import main  # noqa: E402

STARTUP_TIMEOUT_S = 120
PERCENTILES = ("mean", "p50", "p90", "p99")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tiny_gemma3_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--max-num-seqs", "4", "--log-level", "warning", "--shutdown-timeout", "5"]
    with running_server(str(tiny_gemma3_dir), args, log, threads=1,
                        startup_timeout_s=STARTUP_TIMEOUT_S) as (url, _):
        yield url


def _bench(url: str, out: Path, *extra: str) -> int:
    return main(["bench", "serve", "--url", url, "--output-json", str(out), "--timeout", "60",
                 *extra])


def _check_latencies(point: dict) -> None:
    for q in PERCENTILES:
        assert 0 < point["ttft_s"][q] <= point["e2e_s"][q], q
        assert point["itl_s"][q] >= 0 and point["tpot_s"][q] > 0, q


def test_sweep_counts_every_token(server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    num_prompts, input_len, output_len = 4, 8, 6
    rc = _bench(server, out, "--concurrency", "1,2", "--num-prompts", str(num_prompts),
                "--input-len", str(input_len), "--output-len", str(output_len),
                "--plot", str(tmp_path / "serve.png"))
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["benchmark"] == "serve" and report["complete"] is True
    assert report["incomplete_reason"] is None
    assert report["environment"]["date_utc"] and report["environment"]["torch"]
    assert report["server"]["url"] == server and report["server"]["model"]
    assert [p["concurrency"] for p in report["results"]] == [1, 2]
    for point in report["results"]:
        assert point["complete"] and point["completed"] == num_prompts and point["failed"] == 0
        assert point["requests_with_usage"] == num_prompts
        # what we counted on the stream == what the server reported == what we asked for
        assert point["streamed_tokens"] == point["completion_tokens"] == num_prompts * output_len
        assert point["prompt_tokens"] == num_prompts * input_len  # synthetic ids: exact
        assert point["output_tokens_per_s"] > 0 and point["request_throughput"] > 0
        _check_latencies(point)
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_dataset_text_and_token_prompts(server, tmp_path):
    dataset = tmp_path / "requests.jsonl"
    dataset.write_text(json.dumps({"input_ids": [2, 40, 41, 42, 43], "output_tokens": 3}) + "\n\n"
                       + json.dumps({"prompt": "hello", "output_tokens": 4, "task_id": 7})
                       + "\n")
    out = tmp_path / "d.json"
    assert _bench(server, out, "--concurrency", "1", "--dataset", str(dataset)) == 0
    report = json.loads(out.read_text())
    assert report["workload"]["kind"] == "dataset" and report["workload"]["num_requests"] == 2
    (point,) = report["results"]
    assert point["streamed_tokens"] == point["completion_tokens"] == 3 + 4
    # 5 ids as given; "hello" through the one-character-per-token tokenizer, plus <bos>
    assert point["prompt_tokens"] == 5 + (1 + len("hello"))


def test_malformed_dataset_is_one_line(tmp_path, capsys):
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text(json.dumps({"prompt": "ok", "output_tokens": 2}) + "\n"
                       + json.dumps({"prompt": "no length"}) + "\n")
    out = tmp_path / "x.json"
    # the dataset is checked before the server is contacted: no server needed
    rc = _bench(f"http://127.0.0.1:{free_port()}", out, "--concurrency", "1",
                "--dataset", str(dataset))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{dataset}:2" in err and "output_tokens" in err
    assert not out.exists()


def test_unreachable_url_is_one_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "x.json"
    rc = _bench(url, out, "--concurrency", "1,2")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert url in err
    assert not out.exists()


# A fake OpenAI server that dies after K completions -----------------------------------------


class _Fake(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, die_after: int | None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.die_after = die_after
        self.completions = 0
        self.dead = False
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: each response ends by closing the connection, so SSE needs no chunking."""

    server: _Fake

    def log_message(self, *args) -> None:
        pass

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.server.dead:
            return  # closes the connection without an answer
        self._send(json.dumps({"object": "list", "data": [{"id": "fake"}]}).encode(),
                   "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.server.lock:
            self.server.completions += 1
            if self.server.die_after is not None and \
                    self.server.completions > self.server.die_after:
                self.server.dead = True
            if self.server.dead:
                return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        n = body["max_tokens"]
        for _ in range(n):
            chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.002)
        prompt = body["prompt"]
        usage = {"prompt_tokens": len(prompt) if isinstance(prompt, list) else 1,
                 "completion_tokens": n, "total_tokens": 0}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@contextlib.contextmanager
def _fake_server(die_after: int | None = None):
    fake = _Fake(die_after)
    thread = threading.Thread(target=fake.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{fake.server_address[1]}", fake
    finally:
        fake.shutdown()
        fake.server_close()
        thread.join(10)


def test_server_gone_mid_sweep_keeps_partial_report(tmp_path, capsys):
    num_prompts = 3
    # 1 warm-up + 3 at concurrency 1 + 1 at concurrency 2, then every connection is dropped
    with _fake_server(die_after=1 + num_prompts + 1) as (url, fake):
        out = tmp_path / "partial.json"
        rc = _bench(url, out, "--concurrency", "1,2,4", "--num-prompts", str(num_prompts),
                    "--output-len", "5", "--plot", str(tmp_path / "partial.png"))
        sent = fake.completions
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert sent <= 1 + num_prompts + 2  # the sweep stopped: nothing sent at concurrency 4
    report = json.loads(out.read_text())
    assert report["complete"] is False and url in report["incomplete_reason"]
    assert "concurrency 2" in report["incomplete_reason"]
    assert url in err and len(err.splitlines()) == 1, err
    first, second = report["results"]  # the third load point never ran
    assert first["concurrency"] == 1 and first["complete"] is True
    assert first["completed"] == num_prompts and first["completion_tokens"] == num_prompts * 5
    assert second["concurrency"] == 2 and second["complete"] is False
    assert second["failed"] >= 1 and second["completed"] <= 1
    assert (tmp_path / "partial.png").stat().st_size > 0


def test_request_rate_and_old_entry_point(tmp_path):
    """benchmarks/serving.py keeps the old flags (--max-tokens, --out, PNG beside it)."""
    spec = importlib.util.spec_from_file_location("serving_script",
                                                  REPO / "benchmarks" / "serving.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with _fake_server() as (url, fake):
        out = tmp_path / "rate.json"
        rc = script.main(["--url", url, "--request-rate", "100,200", "--num-prompts", "4",
                          "--max-tokens", "3", "--input-len", "5", "--out", str(out),
                          "--label", "fake", "--timeout", "30"])
        assert fake.completions == 1 + 2 * 4
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["label"] == "fake" and report["complete"] is True
    assert [p["rate"] for p in report["results"]] == [100.0, 200.0]
    for point in report["results"]:
        assert point["concurrency"] is None and point["completed"] == 4
        assert point["streamed_tokens"] == point["completion_tokens"] == 4 * 3
        assert point["prompt_tokens"] == 4 * 5
        _check_latencies(point)
    assert out.with_suffix(".png").stat().st_size > 0
