"""Servers for end-to-end tests: `trt-gemma serve` in a subprocess on a free loopback port, or
an app (usually on a fake engine) in a uvicorn thread.

Every wait is bounded in time; the process is terminated (then killed), the thread told to exit
and joined, when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(source: str, args: list[str], log: Path, *, threads: int,
                   startup_timeout_s: float, tls_verify=None,
                   env: dict[str, str | None] | None = None):
    """Yield (url, process) once ``/health`` answers 200. ``tls_verify`` (an ssl.SSLContext
    trusting the server's certificate): the server speaks HTTPS. ``env``: variables to set, or
    to remove where the value is None."""
    port = free_port()
    cmd = [sys.executable, "-m", "trt_gemma.cli", "serve", source, "--port", str(port), *args]
    environ = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environ)
    url = f"{'https' if tls_verify is not None else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout_s
    try:
        with httpx.Client(verify=tls_verify if tls_verify is not None else True,
                          timeout=1) as client:
            while True:
                assert proc.poll() is None, f"server exited early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no /health in {startup_timeout_s} s"
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextlib.contextmanager
def threaded_server(app, startup_timeout_s: float = 30):
    """Yield the root URL of ``app`` served by uvicorn in a daemon thread on a free port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
