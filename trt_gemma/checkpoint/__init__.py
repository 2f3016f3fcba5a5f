"""Checkpoint readers: every format yields a GemmaConfig and the same canonical tensor names."""

from __future__ import annotations

from pathlib import Path

from trt_gemma.checkpoint.base import Checkpoint, expected_tensor_shapes
from trt_gemma.checkpoint.bundled import BUNDLED, bundled_gguf_path
from trt_gemma.errors import CheckpointError

__all__ = ["Checkpoint", "open_checkpoint", "expected_tensor_shapes", "BUNDLED"]


def open_checkpoint(source: str | Path) -> Checkpoint:
    """A bundled name (``gemma3-270m``), a ``.gguf`` file, or an HF directory with config.json."""
    if str(source) in BUNDLED:
        from trt_gemma.checkpoint.gguf import GGUFCheckpoint

        return GGUFCheckpoint(bundled_gguf_path(str(source)))
    path = Path(source)
    if not path.exists():
        known = ", ".join(BUNDLED)
        raise CheckpointError(f"{path}: no such file or directory (bundled models: {known})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(
                f"{path}: unsupported file type (expected a .gguf file or an HF checkpoint "
                "directory; .bin/.pt pickles are never loaded)"
            )
        from trt_gemma.checkpoint.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if (path / "config.json").exists():
        from trt_gemma.checkpoint.hf import HFCheckpoint

        return HFCheckpoint(path)
    raise CheckpointError(f"{path}: no config.json (expected an HF checkpoint directory)")
