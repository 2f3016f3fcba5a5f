"""Triton kernels of trt-gemma, imported as ``trt_gemma.kernels``.

Each kernel family lives in its own module beside its plain-PyTorch reference in ``reference.py``.
Importing this package never imports Triton: kernel modules do that themselves, so CPU-only installs
work without it.
"""
