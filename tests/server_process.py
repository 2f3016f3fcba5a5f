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
                   startup_timeout_s: float):
    """Yield (url, process) once ``/health`` answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "trt_gemma.cli", "serve", source, "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout_s
    try:
        while True:
            assert proc.poll() is None, f"server exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /health in {startup_timeout_s} s"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
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
