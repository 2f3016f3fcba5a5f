"""`trt-gemma serve` in a subprocess on a free loopback port, for end-to-end tests.

Every wait is bounded in time; the process is terminated (then killed) when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
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
