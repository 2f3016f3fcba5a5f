"""What every benchmark JSON records about where it ran, and the PNG plot of a run.

The environment: trt-gemma version and git commit, Python/torch/triton versions, the device, the
CPU model and the flags that decide CPU speed (avx512_bf16, avx2), threads, quant mode, dtype,
and the date (UTC). A figure without these cannot be compared with another one.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

CPU_FLAGS = ("avx512_bf16", "avx512f", "avx2", "amx_bf16")


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the source tree trt_gemma runs from (``-dirty`` with local changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty.strip() else "")


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in (None, "", platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(),
            "flags": {f: (f in flags) if flags else None for f in CPU_FLAGS}}


def environment(device: torch.device, info: dict[str, Any]) -> dict[str, Any]:
    """The environment record; ``info`` is the target's (source, quant, dtype ...)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device.type == "cuda"
    return {
        "trt_gemma_version": _version("trt-gemma"), "git_commit": git_commit(),
        "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton_version, "transformers": _version("transformers"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "cpu": cpu_info(), "torch_threads": torch.get_num_threads(),
        "quant": info.get("quant"), "dtype": info.get("dtype"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def _figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    return plt, fig, axes[0]


def _hist(ax, values: list[float], bins: int, **kw) -> None:
    """A histogram that survives (nearly) equal values: numpy refuses bins narrower than the
    floats' spacing, e.g. token gaps of one shared step time rounded apart by 1e-17."""
    if not values:
        return
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-9 * max(abs(hi), 1e-9):
        bins = 1
    ax.hist(values, bins=bins, **kw)


def _telemetry_panel(ax, samples: list[dict[str, float]]) -> None:
    t = [s["t"] for s in samples]
    ax.plot(t, [s["sm_clock_mhz"] for s in samples], label="SM clock (MHz)")
    ax.plot(t, [s["power_w"] for s in samples], label="power (W)")
    ax.plot(t, [s["utilization_pct"] for s in samples], label="utilisation (%)")
    ax.plot(t, [s["temperature_c"] for s in samples], label="temperature (C)")
    ax.set_xlabel("seconds")
    ax.set_title("GPU telemetry")
    ax.legend(fontsize=7)


def plot_throughput(path: str | Path, trace, samples: list[dict[str, float]], title: str) -> Path:
    """Request latency histogram, output tokens over time, and telemetry when there is some."""
    plt, fig, axes = _figure(3 if samples else 2)
    _hist(axes[0], trace.latencies(), 30, color="tab:blue")
    axes[0].set_xlabel("request latency (s)")
    axes[0].set_ylabel("requests")
    axes[0].set_title("latency distribution")
    axes[1].plot([0.0, *trace.step_end_s], [0, *trace.tokens_after_step], color="tab:green")
    axes[1].set_xlabel("seconds")
    axes[1].set_ylabel("output tokens")
    axes[1].set_title("tokens over time")
    if samples:
        _telemetry_panel(axes[2], samples)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def plot_latency(path: str | Path, traces: dict, samples: list[dict[str, float]],
                 title: str) -> Path:
    """TTFT and per-token latency distributions per batch size, and telemetry."""
    plt, fig, axes = _figure(3 if samples else 2)
    for b, runs in traces.items():
        _hist(axes[0], [x * 1e3 for t in runs for x in t.ttfts()], 20, alpha=0.6,
              label=f"batch {b}")
        _hist(axes[1], [x * 1e3 for t in runs for x in t.inter_token()], 30, alpha=0.6,
              label=f"batch {b}")
    axes[0].set_xlabel("time to first token (ms)")
    axes[1].set_xlabel("per-token latency (ms)")
    for ax in axes[:2]:
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    if samples:
        _telemetry_panel(axes[2], samples)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
