"""GPU telemetry during a run: nvidia-ml-py (``pynvml``) sampled in a background thread.

Sampled every ``interval_s``: SM clock (MHz), memory used (MiB), power (W), temperature (C) and
GPU utilisation (%). The summary gives each one's mean and max; without a CUDA device or without
nvidia-ml-py every field is None and ``why`` says which is missing. NVML calls take tens of
microseconds and run off the engine's thread, so sampling does not slow the run measurably.
"""

from __future__ import annotations

import contextlib
import threading
import time

METRICS = ("sm_clock_mhz", "memory_used_mib", "power_w", "temperature_c", "utilization_pct")


class Telemetry:
    """``with Telemetry(device_index) as tm: ...``; then ``tm.summary()`` and ``tm.samples``."""

    def __init__(self, device_index: int | None, interval_s: float = 0.1,
                 device_uuid: str | None = None):
        self.device_index = device_index  # None: no CUDA device, nothing is sampled
        # "GPU-...": NVML numbers every GPU of the machine, CUDA only the visible ones
        # (CUDA_VISIBLE_DEVICES), so the UUID is what names the same device to both
        self.device_uuid = device_uuid
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []  # {"t": s since start, metric: value, ...}
        self.why: str | None = None
        self.device_name: str | None = None
        self._nvml = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Telemetry:
        if self.device_index is None:
            self.why = "no CUDA device"
            return self
        try:
            import pynvml
        except ImportError:
            self.why = "nvidia-ml-py is not installed: pip install nvidia-ml-py"
            return self
        try:
            pynvml.nvmlInit()
            self._handle = None
            if self.device_uuid is not None:
                with contextlib.suppress(pynvml.NVMLError):
                    self._handle = pynvml.nvmlDeviceGetHandleByUUID(self.device_uuid)
            if self._handle is None:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.device_name = name.decode() if isinstance(name, bytes) else name
        except pynvml.NVMLError as e:
            self.why = f"NVML failed: {e}"
            return self
        self._nvml = pynvml
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="bench-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self.why is None:
                self._sample()  # at least one sample, however short the run
            self._nvml.nvmlShutdown()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        nv, h = self._nvml, self._handle
        try:
            self.samples.append({
                "t": time.perf_counter() - self._start,
                "sm_clock_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                "memory_used_mib": nv.nvmlDeviceGetMemoryInfo(h).used / 2**20,
                "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1e3,
                "temperature_c": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                "utilization_pct": float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
            })
        except nv.NVMLError as e:  # a metric this GPU does not report: stop, say why
            self.why = f"NVML sampling failed: {e}"
            self._stop.set()

    def summary(self) -> dict:
        """{metric: {"mean", "max"} or None, "samples": n, "interval_s", "why"}."""
        out: dict = {"samples": len(self.samples), "interval_s": self.interval_s,
                     "device": self.device_name, "why": self.why}
        for m in METRICS:
            values = [s[m] for s in self.samples]
            out[m] = ({"mean": sum(values) / len(values), "max": max(values)} if values
                      else None)
        if not self.samples and self.why is None:
            self.why = out["why"] = "no samples were taken"
        return out
