"""``trt-gemma bench throughput | latency | serve | guided | gpu-suite`` (trt_gemma/cli.py).

``bench`` is a command group: ``throughput`` and ``latency`` run the engine in-process,
``serve`` sweeps an OpenAI-compatible URL (trt_gemma/bench/serve.py), ``gpu-suite`` runs the
GPU checks. Options are validated after parsing (one-line errors, exit 2), like every
other command's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import sys
from pathlib import Path

from trt_gemma.errors import ConfigError

GiB = 1 << 30


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="throughput, latency and serving benchmarks")
    sub = p.add_subparsers(dest="bench_command", required=True,
                           metavar="{throughput,latency,serve,gpu-suite}")

    t = sub.add_parser("throughput", help="all requests at once: requests/s, tokens/s, latency, "
                                          "KV usage, memory bandwidth")
    _add_common(t)
    t.add_argument("--num-requests", type=int, default=64)
    t.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    t.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    t.add_argument("--len-spread", type=float, default=0.0,
                   help="lengths uniform over len*(1-F)..len*(1+F); 0 = fixed")
    t.add_argument("--dataset", default=None,
                   help='JSONL: {"prompt": str | "input_ids": [int], "output_tokens": int}')
    _add_peer_arguments(t, "also run the requests with: transformers | llama.cpp | an "
                           "OpenAI-compatible server's http(s)://HOST:PORT (repeatable)",
                        "seconds a URL peer has for all the requests")
    t.add_argument("--rounds", type=int, default=1,
                   help="timed runs of the same requests (ours and each in-process peer); the "
                        "report keeps each side's fastest and lists every round")
    t.add_argument("--output-json", required=True, help="where to write the results")
    t.set_defaults(func=cmd_throughput)

    lat = sub.add_parser("latency", help="time to first token and per-token latency per batch")
    _add_common(lat)
    lat.add_argument("--batch-sizes", default="1,4", help="comma-separated")
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=32)
    lat.add_argument("--iterations", type=int, default=3, help="runs per batch size")
    _add_peer_arguments(lat, "also measure with: transformers (means of its batched generate), "
                             "llama.cpp (GGUF sources, batch 1 only) or an OpenAI-compatible "
                             "URL (each batch sent at once, streamed)",
                        "seconds a URL peer has for each batch")
    lat.add_argument("--output-json", default=None, help="where to write the results")
    lat.set_defaults(func=cmd_latency)

    from trt_gemma.bench.serve import add_arguments as add_serve_arguments

    srv = sub.add_parser("serve", help="online: a sweep of concurrencies or request rates "
                                       "against an OpenAI-compatible URL (TTFT, ITL, goodput)")
    add_serve_arguments(srv)
    srv.set_defaults(func=cmd_serve)

    gd = sub.add_parser("guided", help="what guided decoding costs: output tokens/s without a "
                                       "constraint, with a JSON schema and with json_object")
    from trt_gemma.bench.guided import add_arguments as add_guided_arguments

    add_guided_arguments(gd)
    gd.set_defaults(func=cmd_guided)

    g = sub.add_parser("gpu-suite", help="GPU tests, CUDA-graph check, kernels, throughput and "
                                         "latency per preset and quant mode, in a time budget")
    from trt_gemma.bench.gpu_suite import add_arguments

    add_arguments(g)
    g.set_defaults(func=cmd_gpu_suite)


def cmd_serve(args: argparse.Namespace) -> int:
    from trt_gemma.bench.serve import run

    return run(args)


def _add_peer_arguments(p: argparse.ArgumentParser, peer_help: str, timeout_help: str) -> None:
    p.add_argument("--peer", action="append", default=[], help=peer_help)
    p.add_argument("--peer-model", default=None,
                   help="model named in a URL peer's requests (default: its first listed)")
    p.add_argument("--peer-api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent to URL peers as 'Authorization: Bearer KEY' (env OPENAI_API_KEY)")
    p.add_argument("--peer-timeout", type=float, default=600.0, help=timeout_help)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=None,
                   help="bundled name (gemma3-270m), .gguf, HF dir or engine dir "
                        "(none with --random-weights)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights at --preset's shapes instead of a checkpoint")
    p.add_argument("--preset", default=None, help="model shapes for --random-weights "
                                                  "(gemma-2b, gemma-7b, gemma-3-4b ...)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="--random-weights: keep only the first N decoder layers (recorded)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--no-verify", action="store_true", help="skip engine checksum verification")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV-cache size in GiB")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | model")
    p.add_argument("--greedy-head-max-rows", type=int, default=None,
                   help="CPU: greedy steps of up to N rows use the int8-screened LM head "
                        "(default: where it wins; 0 = never, which also skips its ~15 s build "
                        "for a 262k vocabulary)")
    p.add_argument("--cpu-int8-decode-max-rows", type=int, default=0,
                   help="CPU, bf16: steps of up to N tokens run the decoder's linears on INT8 "
                        "copies of their weights (W8A16, +0.2%% perplexity on the 270M); 0 = "
                        "never, the model's own numerics")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic requests")
    from trt_gemma.runtime.speculative.flags import add_speculative_arguments

    add_speculative_arguments(p)
    from trt_gemma.distributed.flags import add_tensor_parallel_argument

    add_tensor_parallel_argument(p)
    p.add_argument("--plot", default=None, help="PNG: latency distribution, tokens over time, "
                                                "telemetry")
    p.add_argument("--telemetry-interval", type=float, default=0.1, help="seconds")


def _device(args: argparse.Namespace):
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _engine_options(args: argparse.Namespace) -> dict:
    """EngineConfig fields of the command line."""
    kw = {"kv_cache_dtype": args.kv_cache_dtype,
          "greedy_head_max_rows": args.greedy_head_max_rows,
          "cpu_int8_decode_max_rows": args.cpu_int8_decode_max_rows}
    if args.max_num_seqs is not None:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_gib is not None:
        if args.kv_cache_gib <= 0:
            raise ConfigError(f"--kv-cache-gib must be > 0, got {args.kv_cache_gib}")
        kw["kv_cache_memory"] = int(args.kv_cache_gib * GiB)
    from trt_gemma.runtime.speculative.flags import speculative_options

    kw.update(speculative_options(args))
    from trt_gemma.distributed.flags import tensor_parallel_options

    kw.update(tensor_parallel_options(args))
    return kw


def _spec_snapshot(engine) -> tuple[int, int, int]:
    s = engine.get_stats()
    return s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens


def _spec_record(engine, before: tuple[int, int, int]) -> dict | None:
    """Acceptance over the measured runs (since ``before``); None without speculation."""
    if engine.config.speculative_method is None:
        return None
    drafts, tokens, accepted = (a - b for a, b in zip(_spec_snapshot(engine), before,
                                                      strict=True))
    return {"num_drafts": drafts, "num_draft_tokens": tokens, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / tokens if tokens else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None}


def _print_spec(spec: dict | None) -> None:
    if spec is not None:
        print(f"  speculative: {spec['num_draft_tokens']} drafts, acceptance "
              f"{_fmt(spec['acceptance_rate'], 100, '%')}, mean accepted length "
              f"{_fmt(spec['mean_accepted_length'])} tokens per verification")


def _engine_record(engine) -> dict:
    from trt_gemma.runtime.engine import choose_kv_dtype

    c = engine.config
    return {"max_num_seqs": c.max_num_seqs, "max_num_batched_tokens": c.max_num_batched_tokens,
            "block_size": c.block_size, "max_model_len": engine.max_model_len,
            "kv_cache_dtype": str(choose_kv_dtype(engine.model, c.kv_cache_dtype))
            .removeprefix("torch."),
            "num_kv_blocks": list(engine.get_stats().num_kv_blocks),
            "greedy_head_max_rows": engine.greedy_head_max_rows if engine.greedy_head else 0,
            "cpu_int8_decode_max_rows": c.cpu_int8_decode_max_rows,
            # Under tensor parallelism the model, bandwidth and KV figures are rank 0's share.
            "tensor_parallel_size": c.tensor_parallel_size,
            "rank_memory": [dataclasses.asdict(m) for m in engine.rank_memory],
            "speculative": None if c.speculative_method is None else {
                "method": c.speculative_method, "num_speculative_tokens": c.num_speculative_tokens,
                "draft_model": c.draft_model, "ngram_min": c.ngram_min, "ngram_max": c.ngram_max,
                "adaptive": c.speculative_adaptive,
                "disable_by_batch_size": c.speculative_disable_by_batch_size}}


def _load(args: argparse.Namespace):
    """(BenchTarget, LLMEngine); with -tp N > 1 the engine's ranks are started here too and
    must be stopped with ``engine.shutdown()``."""
    from trt_gemma.bench.target import load_target, start_sharded_target
    from trt_gemma.runtime import EngineConfig, LLMEngine

    options = _engine_options(args)
    where = {"random_weights": args.random_weights, "preset_name": args.preset,
             "num_layers": args.num_layers, "dtype": args.dtype, "device": _device(args),
             "verify": not args.no_verify}
    if options.get("tensor_parallel_size", 1) > 1:
        return start_sharded_target(args.source, engine_config=options, **where)
    target = load_target(args.source, **where)
    return target, LLMEngine(target.model, target.tokenizer, EngineConfig(**options))


def _bos(target) -> int | None:
    tok = target.tokenizer
    return tok.bos_id if tok is not None else target.model.config.bos_token_id


def _telemetry(model, interval: float):
    from trt_gemma.bench.telemetry import Telemetry

    import torch

    if model.device.type != "cuda":
        return Telemetry(None, interval)
    index = model.device.index if model.device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    uuid = None if uuid is None else "GPU-" + str(uuid).removeprefix("GPU-")
    return Telemetry(index, interval, uuid)


def _title(kind: str, target, env: dict) -> str:
    what = target.info["source"] or f"random {target.info['preset']}"
    layers = f" ({target.info['num_layers']} layers)" if target.info["layers_truncated"] else ""
    return (f"trt-gemma bench {kind}: {what}{layers}, {target.info['dtype']}, "
            f"{env['device_name']}, {env['date_utc']}")


def cmd_throughput(args: argparse.Namespace) -> int:
    from trt_gemma.bench import peers, report, runner, throughput
    from trt_gemma.bench.workload import describe, load_dataset, synthetic
    from trt_gemma.runtime.engine import choose_kv_dtype

    if args.peer_timeout <= 0:
        raise ConfigError(f"--peer-timeout must be > 0, got {args.peer_timeout}")
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    servers = peers.check_peers(args.peer, args.source, urls=True, url_model=args.peer_model,
                                api_key=args.peer_api_key)
    if args.peer_model is not None and not servers:
        raise ConfigError("--peer-model names the model of a URL --peer: none given")
    if args.dataset is not None and not Path(args.dataset).is_file():
        raise ConfigError(f"--dataset {args.dataset}: no such file")
    target, engine = _load(args)
    model = target.model
    try:
        if args.dataset is not None:
            requests = load_dataset(args.dataset, target.tokenizer, model.config.vocab_size)
            workload = {"kind": "dataset", "dataset": str(args.dataset)}
        else:
            requests = synthetic(args.num_requests, args.input_len, args.output_len,
                                 model.config.vocab_size, args.len_spread, args.seed,
                                 _bos(target))
            workload = {"kind": "synthetic", "input_len": args.input_len,
                        "output_len": args.output_len, "len_spread": args.len_spread,
                        "seed": args.seed}
        workload.update(describe(requests))
        runner.check_fits(engine, requests)
        engine_record = _engine_record(engine)
        runner.warm_up(engine, requests)
        spec_before = _spec_snapshot(engine)
        traces = []
        with _telemetry(model, args.telemetry_interval) as tm:
            for i in range(args.rounds):
                engine.block_manager.reset_prefix_cache()  # no round finds the last's prompts
                traces.append(runner.run(engine, requests, prefix=f"round{i}-"))
        trace = min(traces, key=lambda t: t.elapsed_s)
        kv_itemsize = choose_kv_dtype(model, engine.config.kv_cache_dtype).itemsize
        res = throughput.results(model, kv_itemsize, requests, trace,
                                 engine.get_stats().num_kv_blocks)
        res["rounds"] = _rounds_record(traces, trace)
        res["speculative"] = _spec_record(engine, spec_before)
    finally:
        engine.shutdown()  # the other tensor-parallel ranks, if any
    del engine  # its KV cache: the peers need the memory
    gc.collect()
    env = report.environment(model.device, target.info)
    out = {"benchmark": "throughput", "environment": env, "target": target.info,
           "engine": engine_record, "workload": workload, "results": res,
           "telemetry": tm.summary(), "peers": _run_peers(args, target, requests, res, servers)}
    path = report.write_json(args.output_json, out)
    if args.plot:
        report.plot_throughput(args.plot, trace, tm.samples, _title("throughput", target, env))
    _print_throughput(res, out["peers"], out["telemetry"])
    _print_spec(res["speculative"])
    print(f"wrote {path}" + (f" and {args.plot}" if args.plot else ""))
    failed = [p["error"] for p in out["peers"].values() if "error" in p]
    for why in failed:
        print(f"trt-gemma: error: {why}", file=sys.stderr)
    return 1 if failed else 0


def _rounds_record(traces: list, best) -> dict:
    return {"count": len(traces), "kept": traces.index(best),
            "output_tokens_per_s": [t.output_tokens / t.elapsed_s for t in traces]}


def _best_of(rounds: int, measure) -> dict:
    """``measure()`` run ``rounds`` times; the fastest result, with every round's tokens/s."""
    runs = [measure() for _ in range(rounds)]
    best = max(runs, key=lambda r: r["output_tokens_per_s"])
    return {**best, "rounds": {"count": rounds, "kept": runs.index(best),
                               "output_tokens_per_s": [r["output_tokens_per_s"] for r in runs]}}


def _run_peers(args, target, requests, ours: dict, servers: dict) -> dict:
    """Each peer's figures and comparison; ``servers``: the URL peers check_peers probed."""
    import torch

    from trt_gemma.bench import peers

    results = {}
    for name in args.peer:
        if name in servers:
            server = servers[name]
            record = {"url": server["url"], "model": server["model"], "models": server["models"]}
            try:
                # once: a server's own prefix cache would serve a second round's prompts
                res = peers.run_url(server, requests, args.peer_timeout)
            except RuntimeError as e:  # ours is measured: keep it, say why the peer is not
                results[name] = {**record, "error": str(e)}
                continue
            results[name] = {**record, "results": res, "comparison": peers.compare(ours, res)}
            continue
        if name == "transformers":
            hf = peers.load_transformers(args.source, target.model.dtype, target.model.device)
            pad = target.tokenizer.pad_id if target.tokenizer is not None else None
            res = _best_of(args.rounds, functools.partial(
                peers.run_transformers, hf, requests, pad if pad is not None else 0))
            del hf
        else:
            why = peers.llama_cpp_skip_reason(args.source)
            if why is not None:
                print(f"peer llama.cpp: skipped ({why})")
                results[name] = {"skipped": why}
                continue
            res = _best_of(args.rounds, functools.partial(
                peers.run_llama_cpp, args.source, requests, torch.get_num_threads()))
        gc.collect()
        results[name] = {"results": res, "comparison": peers.compare(ours, res)}
    return results


def _fmt(x: float | None, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if x is None else f"{x * scale:.1f}{unit}"


def _print_throughput(res: dict, peer_results: dict, telemetry: dict) -> None:
    lat = res["latency_s"]
    print(f"{res['num_requests']} requests, {res['input_tokens']} prompt + "
          f"{res['output_tokens']} output tokens in {res['elapsed_s']:.2f} s "
          f"({res['steps']} steps)")
    print(f"  {res['requests_per_s']:.2f} req/s, {res['output_tokens_per_s']:.1f} output tok/s, "
          f"{res['total_tokens_per_s']:.1f} total tok/s")
    print(f"  latency mean {_fmt(lat['mean'], 1e3, ' ms')}, p50 {_fmt(lat['p50'], 1e3, ' ms')}, "
          f"p99 {_fmt(lat['p99'], 1e3, ' ms')}; peak KV usage "
          f"{res['peak_kv_cache_usage'] * 100:.1f}%")
    bw = res["bandwidth"]
    if bw["achieved_gbs"] is None:
        print(f"  bandwidth: n/a ({bw['why']})")
    else:
        frac = bw["fraction_of_peak"]
        print(f"  bandwidth {bw['achieved_gbs']:.0f} GB/s"
              + (f" = {frac * 100:.1f}% of peak" if frac is not None else f" ({bw['why']})"))
    if telemetry["why"] is not None:
        print(f"  telemetry: n/a ({telemetry['why']})")
    for name, p in peer_results.items():
        if "comparison" in p:
            c = p["comparison"]["output_tokens_per_s"]
            print(f"  vs {name}: {c['peer']:.1f} output tok/s, speedup {c['speedup']:.2f}x")
            r = p["results"]
            if "token_counts_agree" in r and not r["token_counts_agree"]:
                print(f"  {name}: output tokens disagree: usage {r['usage_output_tokens']} "
                      f"({r['requests_with_usage']} of {r['num_requests']} requests), streamed "
                      f"chunks {r['streamed_output_tokens']}, asked for "
                      f"{r['requested_output_tokens']}")
            elif "requested_output_tokens" in r and \
                    r["output_tokens"] != r["requested_output_tokens"]:
                print(f"  {name}: {r['output_tokens']} output tokens, asked for "
                      f"{r['requested_output_tokens']} (does it honour ignore_eos?)")


def cmd_latency(args: argparse.Namespace) -> int:
    from trt_gemma.bench import latency, peers, report, runner
    from trt_gemma.bench.workload import synthetic

    batch_sizes = latency.parse_batch_sizes(args.batch_sizes)
    if args.peer_timeout <= 0:
        raise ConfigError(f"--peer-timeout must be > 0, got {args.peer_timeout}")
    servers = peers.check_peers(args.peer, args.source, urls=True, url_model=args.peer_model,
                                api_key=args.peer_api_key)
    target, engine = _load(args)
    try:
        probe = synthetic(1, args.input_len, args.output_len, target.model.config.vocab_size)
        runner.check_fits(engine, probe)
        spec_before = _spec_snapshot(engine)
        with _telemetry(target.model, args.telemetry_interval) as tm:
            res, traces = latency.measure(engine, batch_sizes, args.input_len, args.output_len,
                                          args.iterations, _bos(target), args.seed)
        spec = _spec_record(engine, spec_before)
    finally:
        engine.shutdown()  # the other tensor-parallel ranks, if any
    for b, r in res.items():
        print(f"batch {b}: TTFT mean {_fmt(r['ttft_s']['mean'], 1e3, ' ms')} "
              f"p99 {_fmt(r['ttft_s']['p99'], 1e3, ' ms')}; per token mean "
              f"{_fmt(r['per_token_s']['mean'], 1e3, ' ms')} p50 "
              f"{_fmt(r['per_token_s']['p50'], 1e3, ' ms')} p99 "
              f"{_fmt(r['per_token_s']['p99'], 1e3, ' ms')}")
    env = report.environment(target.model.device, target.info)
    _print_spec(spec)
    out = {"benchmark": "latency", "environment": env, "target": target.info,
           "engine": _engine_record(engine), "results": res, "telemetry": tm.summary(),
           "speculative": spec, "peers": {}}
    if args.peer:
        del engine
        gc.collect()
        for name in args.peer:
            out["peers"][name] = _latency_peer(args, name, servers.get(name), target,
                                               batch_sizes, res)
    if args.output_json:
        print(f"wrote {report.write_json(args.output_json, out)}")
    if args.plot:
        report.plot_latency(args.plot, traces, tm.samples, _title("latency", target, env))
        print(f"wrote {args.plot}")
    sys.stdout.flush()
    failed = any("error" in r for p in out["peers"].values() for r in p.values()
                 if isinstance(r, dict))
    return 1 if failed else 0


def cmd_guided(args: argparse.Namespace) -> int:
    from trt_gemma.bench import guided

    return guided.run(args)


def cmd_gpu_suite(args: argparse.Namespace) -> int:
    from trt_gemma.bench import gpu_suite

    return gpu_suite.run(args)


def _latency_peer(args, name: str, server: dict | None, target, batch_sizes: list[int],
                  ours: dict) -> dict:
    """Per batch size: the peer's figures and the comparison, or why it was skipped / failed."""
    import torch

    from trt_gemma.bench import peers
    from trt_gemma.bench.workload import synthetic

    if name == "llama.cpp" and (why := peers.llama_cpp_skip_reason(args.source)) is not None:
        print(f"peer llama.cpp: skipped ({why})")
        return {"skipped": why}
    hf = None
    if name == "transformers":
        hf = peers.load_transformers(args.source, target.model.dtype, target.model.device)
    pad = target.tokenizer.pad_id if target.tokenizer is not None else None
    out: dict = {} if server is None else {"url": server["url"], "model": server["model"]}
    for b in batch_sizes:
        requests = synthetic(b, args.input_len, args.output_len,
                             target.model.config.vocab_size, seed=args.seed, bos_id=_bos(target))
        if hf is not None:
            res = peers.latency_transformers(hf, requests, pad if pad is not None else 0)
        elif server is not None:
            try:
                res = peers.latency_url(server, requests, args.peer_timeout)
            except RuntimeError as e:  # ours is measured: keep it, say why the peer is not
                out[str(b)] = {"error": str(e)}
                print(f"trt-gemma: error: {e}", file=sys.stderr)
                continue
        elif b != 1:
            out[str(b)] = {"skipped": "llama-cpp-python decodes one sequence at a time"}
            continue
        else:
            res = peers.latency_llama_cpp(args.source, requests[0], torch.get_num_threads())
        cmp = peers.compare_latency(ours[str(b)], res)
        out[str(b)] = {"results": res, "comparison": cmp}
        print(f"  vs {name}, batch {b}: TTFT {res['ttft_s'] * 1e3:.1f} ms, per token "
              f"{_fmt(res['per_token_s'], 1e3, ' ms')}; speedup TTFT "
              f"{_fmt(cmp['ttft_s']['speedup'], 1, 'x')}, per token "
              f"{_fmt(cmp['per_token_s']['speedup'], 1, 'x')}")
    return out
