"""The one GPU peak table every benchmark reads (trt_gemma/bench/peaks.py)."""

from __future__ import annotations

from trt_gemma.bench.peaks import PEAKS, peak_tbs, peak_tflops


def test_most_specific_name_wins(monkeypatch):
    monkeypatch.delenv("TRT_GEMMA_PEAK_TBS", raising=False)
    monkeypatch.delenv("TRT_GEMMA_PEAK_TFLOPS", raising=False)
    assert peak_tbs("NVIDIA H100 PCIe") == 2.0 and peak_tbs("NVIDIA H100 80GB HBM3") == 3.35
    assert peak_tbs("NVIDIA H200") == 4.8 and peak_tflops("NVIDIA H200") == 989.0
    assert peak_tbs("NVIDIA L40S") == 0.864 and peak_tbs("NVIDIA L4") == 0.3
    assert peak_tbs("NVIDIA A100-SXM4-40GB") == 1.555 and peak_tbs("NVIDIA A100 80GB PCIe") == 2.0
    assert peak_tbs("Some Future GPU") is None and peak_tflops("Some Future GPU") is None
    # every entry is reachable: no earlier key is a substring of a later one
    keys = [k for k, _, _ in PEAKS]
    for i, key in enumerate(keys):
        assert not any(earlier in key for earlier in keys[:i]), key


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("TRT_GEMMA_PEAK_TBS", "1.5")
    monkeypatch.setenv("TRT_GEMMA_PEAK_TFLOPS", "100")
    assert peak_tbs("NVIDIA H200") == 1.5 and peak_tflops("Some Future GPU") == 100.0
