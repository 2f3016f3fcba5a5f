"""Datasheet peaks of the GPUs the benchmarks compare against: one table for every benchmark.

Matched as substrings of ``torch.cuda.get_device_name()``, most specific first: (HBM TB/s, i.e.
10**12 bytes/s; dense bf16 tensor-core TFLOP/s, None where not listed). ``TRT_GEMMA_PEAK_TBS`` /
``TRT_GEMMA_PEAK_TFLOPS`` override them (a GPU not in the table, a clock-limited part).
"""

from __future__ import annotations

import os

PEAKS = (
    ("H200", 4.8, 989.0),
    ("H100 PCIe", 2.0, 756.0),
    ("H100 NVL", 3.9, 835.0),
    ("H100", 3.35, 989.0),  # SXM
    ("H800", 3.35, 989.0),
    ("A100-SXM4-40GB", 1.555, 312.0),
    ("A100", 2.0, 312.0),
    ("L40S", 0.864, 362.0),
    ("L40", 0.864, 181.0),
    ("L4", 0.3, 121.0),
    ("A10G", 0.6, None),
    ("RTX 4090", 1.008, 165.0),
)


def _env(key: str) -> float | None:
    return float(os.environ[key]) if os.environ.get(key) else None


def peak_tbs(device_name: str) -> float | None:
    """Peak memory bandwidth in TB/s of the named device, or None if unknown."""
    found = next((tbs for key, tbs, _ in PEAKS if key in device_name), None)
    return _env("TRT_GEMMA_PEAK_TBS") or found


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 tensor-core peak in TFLOP/s of the named device, or None if unknown."""
    found = next((fl for key, _, fl in PEAKS if key in device_name), None)
    return _env("TRT_GEMMA_PEAK_TFLOPS") or found
