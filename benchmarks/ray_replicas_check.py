"""Replicas on Ray Serve, checked end to end with the official ``openai`` client.

Starts a local Ray, deploys ``--replicas`` CPU replicas of the model behind one ingress, then:

1. spread: requests (chat and completions, streamed and not) from several threads; each answer's
   ``x-trt-gemma-replica`` header says which replica served it; every replica must serve some;
2. kill: a load of streamed and non-streamed requests in flight on every replica, then one
   replica's actor is killed (``ray.kill``): its requests must end with an OpenAI-style error
   (a 503 body, or an error event closing the stream) within the client's timeout, never a
   hang, an HTML page or a 500; the other replicas' requests must succeed;
   with the prefix-aware router, requests sharing a long prefix, sent one at a time, must all
   reach the same replica (the one holding the prefix's KV blocks), and a stream whose client
   hangs up must stop running in its replica (read from that replica's own /metrics);
3. after: requests sent right after the kill must all succeed (served by the survivors);
4. restart: Ray must bring the replica count back (serve.status), and a request must reach the
   new replica.

Prints per-replica counts and every outcome, writes a JSON report with ``--output-json``, and
exits 1 if any check fails. Memory: each replica holds the model (270M fp32: ~1.1 GiB) and its
KV cache (``--kv-cache-gib``).

    python benchmarks/ray_replicas_check.py --source gemma3-270m --replicas 2
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPLICA_HEADER = "x-trt-gemma-replica"
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is",
           "A haiku about the sea:", "def fibonacci(n):", "The three primary colors are"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """Streams in progress per replica (a stream's headers name its replica before any token;
    a non-streamed answer's only at its end, so those are not counted)."""

    def __init__(self):
        self.lock, self.counts = threading.Lock(), collections.Counter()

    def add(self, replica: str | None, delta: int) -> None:
        with self.lock:
            self.counts[replica] += delta

    def busiest(self) -> tuple[str | None, int]:
        with self.lock:
            return max(self.counts.items(), key=lambda kv: kv[1], default=(None, 0))


def one_request(client, index: int, max_tokens: int, running: Running | None = None,
                prompt: str | None = None) -> dict:
    """One request of a kind picked by index; returns its replica and outcome."""
    import openai

    stream, chat = index % 2 == 0, index % 4 < 2
    prompt = prompt or PROMPTS[index % len(PROMPTS)]
    kind = f"{'chat' if chat else 'completion'}{' stream' if stream else ''}"
    replica, tokens = None, 0
    try:
        if chat:
            raw = client.chat.completions.with_raw_response.create(
                model=client.model_name, messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens, temperature=0, stream=stream)
        else:
            raw = client.completions.with_raw_response.create(
                model=client.model_name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                stream=stream)
        replica = raw.headers.get(REPLICA_HEADER)
        reply = raw.parse()
        if stream:
            if running is not None:
                running.add(replica, 1)
            try:
                for chunk in reply:
                    tokens += 1 if chunk.choices else 0
            finally:
                if running is not None:
                    running.add(replica, -1)
        else:
            tokens = reply.usage.completion_tokens
        return {"index": index, "kind": kind, "replica": replica, "outcome": "ok",
                "chunks_or_tokens": tokens}
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {"index": index, "kind": kind, "replica": replica or e.response.headers.get(
            REPLICA_HEADER), "outcome": "openai_error", "status": e.status_code,
            "code": body.get("code"), "message": str(body.get("message", e))[:160],
            "json_body": isinstance(e.body, dict)}
    except openai.APIError as e:  # an error event inside a stream (no status)
        body = e.body if isinstance(e.body, dict) else {}
        return {"index": index, "kind": kind, "replica": replica, "outcome": "stream_error",
                "code": body.get("code"), "message": str(e)[:160],
                "chunks_or_tokens": tokens}
    except Exception as e:  # timeouts, broken connections: not clean
        return {"index": index, "kind": kind, "replica": replica, "outcome": "unclean",
                "error": f"{type(e).__name__}: {e}"[:200]}


def start_serve_on_free_port(tries: int = 3) -> int:
    """Ray's own processes take random ports too: a port free a moment ago may be gone."""
    from ray import serve

    for attempt in range(tries):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except Exception:
            serve.shutdown()
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def replica_states(app_name: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[app_name].deployments["ModelReplica"]
    return {str(k): v for k, v in status.replica_states.items()}


def run_check(source: str, replicas: int = 2, max_tokens: int = 8, kill_load: int = 8,
              kv_cache_gib: float = 0.25, max_num_seqs: int = 8, ray_cpus: int = 2,
              restart_timeout_s: float = 300, router: str = "prefix",
              log=print) -> dict:
    import openai
    import ray
    from ray import serve

    from trt_gemma.deploy.ray_serve import APP_NAME, build_application
    from trt_gemma.deploy.settings import ReplicaSettings, ScaleSettings

    report: dict = {"source": source, "replicas": replicas, "max_tokens": max_tokens,
                    "router": router, "checks": {}}
    ray.init(num_cpus=ray_cpus, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    try:
        port = start_serve_on_free_port()
        replica = ReplicaSettings(source=source, dtype="float32", device="cpu",
                                  engine_config={"max_num_seqs": max_num_seqs,
                                                 "kv_cache_memory": int(kv_cache_gib * (1 << 30))},
                                  torch_threads=1)
        scale = ScaleSettings(replicas=replicas, cpus_per_replica=ray_cpus / replicas,
                              router=router, health_check_period_s=2.0)
        t0 = time.monotonic()
        serve.run(build_application(replica, scale), name=APP_NAME, route_prefix="/")
        report["deploy_s"] = round(time.monotonic() - t0, 1)
        log(f"deployed {replicas} replicas in {report['deploy_s']} s: "
            f"{replica_states(APP_NAME)}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        client.model_name = client.models.list().data[0].id

        # 1. spread
        with ThreadPoolExecutor(4) as pool:
            spread = list(pool.map(lambda i: one_request(client, i, max_tokens),
                                   range(4 * replicas)))
        counts = collections.Counter(r["replica"] for r in spread)
        report["spread"] = {"per_replica": dict(counts),
                            "outcomes": dict(collections.Counter(r["outcome"] for r in spread))}
        log(f"spread: per-replica counts {dict(counts)}; outcomes {report['spread']['outcomes']}")
        report["checks"]["spread_over_all_replicas"] = (
            len(counts) == replicas and None not in counts
            and all(r["outcome"] == "ok" for r in spread))

        # 1b. prefix affinity: one long shared prefix, different endings, one at a time (so
        # the load is balanced and the prefix-aware router may follow the prefix)
        shared = ("You are a careful assistant who answers in one short sentence. " * 5)
        affinity = [one_request(client, 1, 2, prompt=f"{shared}Question {i}: name a colour.")
                    for i in range(4)]
        report["affinity"] = {"replicas": [r["replica"] for r in affinity],
                              "outcomes": [r["outcome"] for r in affinity]}
        log(f"shared-prefix requests went to {report['affinity']['replicas']}")
        if router == "prefix":
            report["checks"]["prefix_affinity"] = (
                len(set(report["affinity"]["replicas"])) == 1
                and all(r["outcome"] == "ok" for r in affinity))

        # 1c. a client that hangs up mid-stream: its request must be aborted in the replica
        # (the prefix-aware router sends a /metrics probe carrying the same prompt to the
        # replica that holds the stream, so its own gauge can be read)
        if router == "prefix":
            report["disconnect"] = disconnect_check(client, shared, APP_NAME)
            log(f"client hang-up: {report['disconnect']}")
            report["checks"]["hangup_aborts_in_replica"] = report["disconnect"]["aborted"]

        # 2. kill one replica while every replica holds requests (streams tell their replica
        # with their headers, before their first token)
        running = Running()
        with ThreadPoolExecutor(kill_load) as pool:
            futures = [pool.submit(one_request, client, i, max_tokens * 4, running)
                       for i in range(kill_load)]
            deadline = time.monotonic() + 120
            victim, streams = None, 0
            while time.monotonic() < deadline and not all(f.done() for f in futures):
                victim, streams = running.busiest()
                if streams >= 2 or (streams and len(running.counts) >= replicas):
                    break
                time.sleep(0.05)
            assert victim is not None and streams, "no stream was running within 120 s"
            actor_name = f"SERVE_REPLICA::{APP_NAME}#ModelReplica#{victim}"
            in_flight = sum(not f.done() for f in futures)
            log(f"killing replica {victim} with {streams} streams on it and {in_flight} "
                f"requests in flight in all")
            ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)
            t_kill = time.monotonic()
            results = [f.result() for f in futures]
        report["kill"] = {"victim": victim, "streams_on_victim_at_kill": streams,
                          "in_flight_at_kill": in_flight,
                          "results": results,
                          "seconds_to_settle": round(time.monotonic() - t_kill, 1)}
        for r in results:
            log(f"  kill-load #{r['index']:2d} {r['kind']:<18} replica {r['replica']}: "
                f"{r['outcome']} {r.get('status', '')} {r.get('code') or ''}")
        failed = [r for r in results if r["outcome"] != "ok"]
        report["checks"]["victim_requests_fail_cleanly"] = all(
            r["outcome"] in ("openai_error", "stream_error")
            and r.get("status", 503) == 503 and r.get("code") for r in failed)
        report["checks"]["no_unclean_outcomes"] = all(r["outcome"] != "unclean"
                                                      for r in results)
        report["checks"]["victim_requests_failed"] = any(
            r["replica"] == victim and r["outcome"] != "ok" for r in results)
        report["checks"]["survivor_requests_succeed"] = all(
            r["outcome"] == "ok" for r in results if r["replica"] not in (victim, None))

        # 3. right after the kill, before any restart
        with ThreadPoolExecutor(4) as pool:
            after = list(pool.map(lambda i: one_request(client, i, max_tokens),
                                  range(2 * replicas)))
        report["after"] = {"per_replica": dict(collections.Counter(r["replica"]
                                                                   for r in after)),
                           "outcomes": [r["outcome"] for r in after]}
        log(f"after the kill: {report['after']}")
        report["checks"]["later_requests_succeed"] = all(r["outcome"] == "ok" for r in after)

        # 4. Ray replaces the replica
        deadline = time.monotonic() + restart_timeout_s
        while time.monotonic() < deadline and replica_states(APP_NAME).get("RUNNING") != replicas:
            time.sleep(1)
        report["restart"] = {"states": replica_states(APP_NAME),
                             "seconds": round(time.monotonic() - t_kill, 1)}
        seen: set[str] = set()
        known = set(counts) | {victim}
        for i in range(8 * replicas):  # until the new replica answers
            # Prompts no replica has seen: the prefix-aware router would send the known ones
            # to the replica that served them (and holds their KV blocks).
            r = one_request(client, i, 2, prompt=f"{i} {time.time_ns()} Write a word:")
            seen.add(r["replica"])
            if r["outcome"] != "ok" or (seen - known):
                break
        report["restart"]["new_replica_answered"] = sorted(seen - known)
        log(f"restart: {report['restart']}")
        report["checks"]["replica_restarted"] = (
            report["restart"]["states"].get("RUNNING") == replicas
            and bool(report["restart"]["new_replica_answered"]))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    report["passed"] = all(report["checks"].values())
    log(f"checks: {report['checks']} -> {'PASS' if report['passed'] else 'FAIL'}")
    return report


def replica_gauge(app_name: str, prompt: str, name: str) -> tuple[str, float]:
    """(replica id, value) of a gauge in /metrics of the replica the router picks for
    ``prompt``: straight through the model deployment's handle, as the ingress calls it."""
    import asyncio

    from ray import serve

    from trt_gemma.deploy.asgi_bridge import ForwardedRequest

    handle = serve.get_deployment_handle("ModelReplica", app_name).options(
        method_name="handle", stream=True)

    async def probe():
        parts = [p async for p in handle.remote(ForwardedRequest("GET", "/metrics",
                                                                 prompt=prompt))]
        text = b"".join(p if isinstance(p, bytes) else p.body for p in parts).decode()
        value = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith(name + "{"))
        return parts[0].header(b"x-trt-gemma-replica").decode(), value

    return asyncio.run(probe())


def disconnect_check(client, prefix: str, app_name: str) -> dict:
    prompt = f"{prefix}Question 9: tell a very long story."
    stream = client.completions.with_raw_response.create(
        model=client.model_name, prompt=prompt, max_tokens=400, temperature=0, stream=True)
    replica = stream.headers.get(REPLICA_HEADER)
    chunks = stream.parse()
    next(iter(chunks))
    during = replica_gauge(app_name, prompt, "trt_gemma_requests_running")
    chunks.close()  # hang up after the first token
    deadline, after = time.monotonic() + 15, during
    while time.monotonic() < deadline:
        time.sleep(0.5)
        after = replica_gauge(app_name, prompt, "trt_gemma_requests_running")
        if after[1] == 0:
            break
    return {"replica": replica, "running_during": during, "running_after": after,
            "aborted": during == (replica, 1.0) and after == (replica, 0.0)}


def run_autoscale_check(source: str, max_replicas: int = 2, concurrency: int = 4,
                        timeout_s: float = 300, log=print) -> dict:
    """Ray's autoscaling on ongoing requests: from 1 replica (target 1 request each) to
    ``max_replicas`` under a steady load of ``concurrency`` streams."""
    import openai
    import ray
    from ray import serve

    from trt_gemma.deploy.ray_serve import APP_NAME, build_application
    from trt_gemma.deploy.settings import ReplicaSettings, ScaleSettings

    report: dict = {"source": source, "max_replicas": max_replicas, "checks": {}}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    try:
        port = start_serve_on_free_port()
        replica = ReplicaSettings(source=source, dtype="float32", device="cpu",
                                  engine_config={"max_num_seqs": 4,
                                                 "kv_cache_memory": 256 << 20},
                                  torch_threads=1)
        scale = ScaleSettings(replicas=1, max_replicas=max_replicas, target_ongoing_requests=1,
                              cpus_per_replica=2 / max_replicas)
        serve.run(build_application(replica, scale), name=APP_NAME, route_prefix="/")
        log(f"deployed: {replica_states(APP_NAME)}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        client.model_name = client.models.list().data[0].id
        stop, outcomes, lock = threading.Event(), collections.Counter(), threading.Lock()

        def load(worker: int) -> None:
            i = worker
            while not stop.is_set():
                r = one_request(client, 2 * i, 24, prompt=f"{i} {time.time_ns()} Tell a story:")
                with lock:
                    outcomes[(r["replica"], r["outcome"])] += 1
                i += concurrency

        t0 = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            for w in range(concurrency):
                pool.submit(load, w)
            while (time.monotonic() - t0 < timeout_s
                   and replica_states(APP_NAME).get("RUNNING", 0) < max_replicas):
                time.sleep(2)
            report["scaled_up_after_s"] = round(time.monotonic() - t0, 1)
            time.sleep(20)  # some load on the new replica too
            stop.set()
        report["states"] = replica_states(APP_NAME)
        report["per_replica_outcomes"] = {f"{k[0]} {k[1]}": v for k, v in outcomes.items()}
        log(f"autoscale: {report}")
        report["checks"]["scaled_up"] = report["states"].get("RUNNING") == max_replicas
        report["checks"]["all_requests_ok"] = all(k[1] == "ok" for k in outcomes)
        report["checks"]["new_replicas_served"] = len({k[0] for k in outcomes}) == max_replicas
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    report["passed"] = all(report["checks"].values())
    log(f"checks: {report['checks']} -> {'PASS' if report['passed'] else 'FAIL'}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="gemma3-270m")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--kill-load", type=int, default=8, help="requests in flight at the kill")
    parser.add_argument("--kv-cache-gib", type=float, default=0.25)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--router", choices=("prefix", "pow2"), default="prefix")
    parser.add_argument("--autoscale", action="store_true",
                        help="instead: 1 replica autoscaling to --replicas under load")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.autoscale:
        report = run_autoscale_check(args.source, max_replicas=args.replicas)
    else:
        report = run_check(args.source, args.replicas, args.max_tokens, args.kill_load,
                           args.kv_cache_gib, ray_cpus=args.ray_cpus, router=args.router)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
