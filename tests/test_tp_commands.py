"""``-tp N`` on every command: generate, eval, bench and serve split a tiny Gemma 3 over 2 ranks
(gloo processes on the CPU, started by the command itself).

transformers is the independent reference: greedy text (generate, serve through the official
``openai`` client) and perplexity (eval) of TP = 2 equal what the transformers model computes,
as do TP = 1's. The bench's per-rank memory is checked against the parameter bytes of the
transformers model. A server whose worker rank is killed exits 1 with the rank named in its log.
"""

from __future__ import annotations

import json
import math
import signal
import time
from types import SimpleNamespace

import pytest
import torch
from hf_tiny import save_tiny_with_tokenizer

from trt_gemma.cli import main
from trt_gemma.errors import ConfigError

VOCAB = 102  # exactly the character tokenizer's ids, so every generated token prints
PROMPT = "The cat"
MAX_TOKENS = 12
TEXT = "A small text to score: the quick brown fox jumps over the lazy dog, twice over."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, transformers model) of a tiny random Gemma 3 (4 heads, 2 KV heads)."""
    directory = tmp_path_factory.mktemp("tp-commands")
    model = save_tiny_with_tokenizer("gemma3-gqa", directory, VOCAB)
    return directory, model


@pytest.fixture(autouse=True)
def keep_threads():
    """A command over N CPU ranks gives rank 0 (this process) cores / N threads; restore them."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tokenizer(directory):
    from trt_gemma.tokenizer import GemmaTokenizer

    return GemmaTokenizer.from_hf_dir(directory)


def _hf_greedy_text(tiny, prompt: str, max_tokens: int) -> str:
    directory, model = tiny
    tok = _tokenizer(directory)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in tok.stop_token_ids]
    return tok.decode(new)


def _hf_perplexity(tiny, text: str) -> float:
    directory, model = tiny
    tok = _tokenizer(directory)
    ids = torch.tensor([[tok.bos_id, *tok.encode(text, add_bos=False)]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_tp2_prints_the_greedy_text_of_transformers(tiny, capsys):
    directory, _ = tiny
    expected = _hf_greedy_text(tiny, PROMPT, MAX_TOKENS)
    assert expected.strip(), "the reference generated nothing printable"
    texts = {}
    for tp in (1, 2):
        rc, out, err = _run(capsys, ["generate", str(directory), PROMPT, "--quiet", "--dtype",
                                     "float32", "--device", "cpu", "--max-tokens",
                                     str(MAX_TOKENS), "-tp", str(tp)])
        assert rc == 0, err
        texts[tp] = out.removesuffix("\n")
    assert texts[1] == texts[2] == expected


def test_eval_tp2_perplexity_equals_tp1_and_transformers(tiny, tmp_path, capsys):
    directory, _ = tiny
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    results = {}
    for tp in (1, 2):
        rc, out, err = _run(capsys, ["eval", str(directory), "--text", str(text_file), "--json",
                                     "--dtype", "float32", "--device", "cpu",
                                     "--tensor-parallel-size", str(tp)])
        assert rc == 0, err
        results[tp] = json.loads(out)
        assert results[tp]["tensor_parallel_size"] == tp
    reference = _hf_perplexity(tiny, TEXT)
    assert results[2]["num_predicted"] == results[1]["num_predicted"] == len(TEXT)
    assert results[2]["perplexity"] == pytest.approx(results[1]["perplexity"], rel=1e-4)
    assert results[1]["perplexity"] == pytest.approx(reference, rel=1e-4)


def test_bench_tp2_records_the_ranks_and_their_memory(tiny, tmp_path, capsys):
    directory, model = tiny
    report = tmp_path / "bench.json"
    rc, _, err = _run(capsys, ["bench", "throughput", str(directory), "--dtype", "float32",
                               "--device", "cpu", "-tp", "2", "--num-requests", "3",
                               "--input-len", "6", "--output-len", "4", "--kv-cache-gib", "0.01",
                               "--output-json", str(report)])
    assert rc == 0, err
    record = json.loads(report.read_text())
    engine = record["engine"]
    assert engine["tensor_parallel_size"] == 2 and record["target"]["tensor_parallel_size"] == 2
    assert [m["rank"] for m in engine["rank_memory"]] == [0, 1]
    assert record["results"]["output_tokens"] == 3 * 4
    # reference: the transformers model's parameters (tied LM head counted once). Each rank
    # holds about half (the split weights) plus the replicated norms, never the whole.
    whole = sum(p.numel() * 4 for p in model.parameters())
    weights = [m["weight_bytes"] for m in engine["rank_memory"]]
    assert weights[0] == weights[1] and whole / 2 <= weights[0] < 0.6 * whole
    assert all(m["kv_cache_bytes"] > 0 for m in engine["rank_memory"])
    assert len({m["kv_cache_bytes"] for m in engine["rank_memory"]}) == 1  # one KV plan


@pytest.mark.parametrize("command", ["generate", "eval", "bench", "serve"])
@pytest.mark.parametrize("size", ["0", "3"])  # 3: 4 attention heads do not divide over 3
def test_invalid_tensor_parallel_size_is_one_line_exit_2(tiny, tmp_path, capsys, command, size):
    directory = str(tiny[0])
    argv = {"generate": ["generate", directory, "hi"],
            "eval": ["eval", directory, "--text", "bundled:heldout.txt"],
            "bench": ["bench", "latency", directory, "--output-json", str(tmp_path / "b.json")],
            "serve": ["serve", directory, "--port", "0"]}[command]
    rc, _, err = _run(capsys, [*argv, "--device", "cpu", "-tp", size])
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("trt-gemma: error:")]
    assert len(lines) == 1 and "--tensor-parallel-size" in lines[0], err
    assert ("must be >= 1" if size == "0" else "do not divide over 3") in lines[0]


def test_bench_refuses_random_weights_over_ranks(capsys):
    rc, _, err = _run(capsys, ["bench", "latency", "--random-weights", "--preset", "gemma-2b",
                               "-tp", "2", "--device", "cpu"])
    assert rc == 2 and "--random-weights" in err and len(err.strip().splitlines()) == 1


def test_trtllm_engine_keeps_its_built_split():
    """tensor_parallel_size reaching the TensorRT-LLM backend must be the engine's tp_size."""
    from trt_gemma.trtllm_runtime.engine import runtime_options

    found = SimpleNamespace(max_seq_len=64, max_batch_size=4, max_num_tokens=None,
                            max_attention_window=None, sink_token_length=0,
                            engine_dir="/engines/e", pretrained_config={"mapping": {"tp_size": 2}})
    assert runtime_options(found).llm["tensor_parallel_size"] == 2
    assert runtime_options(found, tensor_parallel_size=2).llm["tensor_parallel_size"] == 2
    with pytest.raises(ConfigError, match="built for 2 rank") as e:
        runtime_options(found, tensor_parallel_size=4)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="tensor_parallel_timeout_s"):
        runtime_options(found, tensor_parallel_size=2, tensor_parallel_timeout_s=5.0)


def _rank_workers(pid: int) -> list:
    """The spawned rank processes of the server (not multiprocessing's resource tracker)."""
    import psutil

    return [c for c in psutil.Process(pid).children()
            if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in
            " ".join(c.cmdline())]


def test_serve_tp2_answers_openai_then_exits_when_a_rank_dies(tiny, tmp_path):
    """Starts `trt-gemma serve -tp 2` in a subprocess (~10 s on 2 cores): its greedy text
    through the official client equals transformers'; killing the worker rank mid-stream ends
    that stream with the rank failure and makes the server exit 1, the rank named in its log."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("psutil")
    from server_process import running_server

    directory, _ = tiny
    expected = _hf_greedy_text(tiny, PROMPT, MAX_TOKENS)
    log = tmp_path / "serve.log"
    args = ["--dtype", "float32", "--device", "cpu", "-tp", "2", "--tensor-parallel-timeout",
            "10", "--kv-cache-gib", "0.01", "--max-num-seqs", "4", "--served-model-name", "tiny"]
    with running_server(str(directory), args, log, threads=2, startup_timeout_s=120) as (url,
                                                                                     proc):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                        temperature=0.0)
        assert out.choices[0].text == expected
        text = log.read_text()
        assert "tensor-parallel rank 1/2" in text and "tensor_parallel_size 2" in text
        (worker,) = _rank_workers(proc.pid)
        # a request in flight when the rank dies: its stream ends with the rank failure
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200,
                                           temperature=0.0, stream=True,
                                           extra_body={"ignore_eos": True})
        pieces = [next(iter(stream)).choices[0].text]
        worker.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(openai.APIError, match="tensor-parallel rank"):
            for chunk in stream:
                pieces.append(chunk.choices[0].text)
        assert len(pieces) < 200
        rc = proc.wait(60)
        took = time.monotonic() - start
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert took < 30, took
    errors = [line for line in text.splitlines() if line.startswith("trt-gemma: error:")]
    assert len(errors) == 1, text[-3000:]
    # whichever notices first: the step's collective, or the watch on the rank processes
    assert "tensor-parallel rank" in errors[0]
    assert "a peer rank died" in errors[0] or "rank 1 (pid" in errors[0], errors[0]


def test_client_notices_an_exited_rank_while_idle_and_keeps_it():
    """An idle engine runs no collective, so a worker that exits is seen through its process:
    the failure is kept after the engine (stopping) forgets its ranks; an orderly stop is none."""
    from trt_gemma.distributed.group import RankFailure
    from trt_gemma.server.engine_client import EngineClient

    workers = [SimpleNamespace(pid=101, exitcode=None), SimpleNamespace(pid=102, exitcode=None)]
    ranks = SimpleNamespace(stopped=False, pool=SimpleNamespace(processes=workers))
    engine = SimpleNamespace(error=None, engine=SimpleNamespace(ranks=ranks))
    client = EngineClient(engine, None, 64, 100, 4, 0)
    assert client.failure() is None
    ranks.stopped = True  # an orderly shutdown: workers exit 0 and are no failure
    workers[1].exitcode = 0
    assert client.failure() is None
    ranks.stopped, workers[1].exitcode = False, -9
    failure = client.failure()
    assert isinstance(failure, RankFailure) and "rank 2 (pid 102) exited with code -9" in str(
        failure)
    engine.engine.ranks = None  # the engine thread stopped what was left
    assert client.failure() is failure
