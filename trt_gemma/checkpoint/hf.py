"""Hugging Face checkpoint directories: config.json + safetensors (one file or sharded)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from trt_gemma.checkpoint.base import Checkpoint
from trt_gemma.config import GemmaConfig
from trt_gemma.errors import CheckpointError

_INDEX = "model.safetensors.index.json"


def canonical_hf_name(hf_name: str, config: GemmaConfig) -> str | None:
    """Map an HF tensor name to ours; None for tensors we do not use (e.g. vision towers)."""
    name = re.sub(r"^(language_model\.)?(model\.)?(language_model\.)?", "", hf_name)
    if name.startswith(("vision_tower", "multi_modal_projector")):
        return None
    if config.architecture == "gemma":
        name = name.replace("post_attention_layernorm", "pre_feedforward_layernorm")
    return name


class HFCheckpoint(Checkpoint):
    """Reads tensors lazily with safetensors' ``safe_open``: never unpickles, never reads all."""

    def __init__(self, path: Path):
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        config = GemmaConfig.from_json_file(path / "config.json")
        super().__init__(path, config)
        self._locations = self._index_tensors()

    def _shard_files(self) -> list[Path]:
        index = self.path / _INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: malformed index (expected a weight_map)") from None
            return [self.path / f for f in sorted(set(weight_map.values()))]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files (only safetensors is read)")
        return files

    def _index_tensors(self) -> dict[str, tuple[Path, str]]:
        locations: dict[str, tuple[Path, str]] = {}
        for file in self._shard_files():
            if not file.exists():
                raise CheckpointError(f"{file}: shard named in {_INDEX} is missing")
            # Compare the bytes the header promises with the file size first, so a truncated
            # download is reported as such, naming the file.
            size, end = file.stat().st_size, _data_end(file)
            if end > size:
                raise CheckpointError(f"{file}: truncated ({size} bytes, header needs {end})")
            try:
                with safe_open(str(file), framework="pt") as f:
                    keys = list(f.keys())
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None
            for key in keys:
                name = canonical_hf_name(key, self.config)
                if name is not None:
                    locations[name] = (file, key)
        return locations

    def tensor_names(self) -> list[str]:
        return list(self._locations)

    def _read(self, name: str) -> torch.Tensor:
        file, key = self._locations[name]
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key)

    def load_tokenizer(self):
        from trt_gemma.tokenizer import GemmaTokenizer

        return GemmaTokenizer.from_hf_dir(self.path)


def _data_end(file: Path) -> int:
    """The file size a safetensors header promises: 8 + header length + the largest data offset."""
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated (no safetensors header)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: truncated or corrupt safetensors header") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)
