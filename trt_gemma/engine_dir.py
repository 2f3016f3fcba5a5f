"""The engine directory: what ``trt-gemma build`` writes and the runtime loads.

Layout::

    ENGINE_DIR/
      engine.json                format version, GemmaConfig, QuantConfig, build profile, weight
                                 index, sha256 and size of every other file, versions that built it
      weights-00001.safetensors  tensors in shards of about 2 GiB (safetensors only, never pickle)
      tokenizer/                 tokenizer files copied from the source

engine.json also records ``generation_config``: the source's sampling defaults (read from its
``generation_config.json``, see ``checkpoint/generation.py``), applied to requests that leave a
field unset, as vLLM does.

Quantized weights are stored as plain tensors. A weight passed to ``write_engine`` as ``X.weight``
(or any name ``X``) is stored under the prefix ``X``:

- ``Int4Weight``: ``X.qweight`` uint8 [out, in/2], ``X.scales`` [out, G], ``X.zeros`` uint8
  [out, G] (asymmetric only), ``X.pre_quant_scale`` [in] (AWQ only); layout in
  ``kernels/gemm_w4a16.py``.
- ``Fp8Weight``: ``X.weight`` float8_e4m3fn [out, in], ``X.weight_scale`` fp32 [out] or [],
  ``X.input_scale`` fp32 [] (static activation scale only); see ``kernels/gemm_fp8.py``.

FP8 KV-cache scales are plain fp32 scalars ``layers.{i}.self_attn.k_scale`` and ``.v_scale`` (the
cache stores k / k_scale, see ``kernels/reference.py``), as vLLM names them.

``engine.json["weights"]["quantized"]`` records each quantized weight by its original name with
its format (and group size), so ``Engine.load_weights`` reassembles the objects under that name.
All parts of a weight land in one shard.

Writes are atomic: everything goes into a sibling ``<target>.tmp-<random>`` directory, engine.json
last, and the directory is renamed into place only when complete, so an interrupted build leaves
nothing at the target. This module imports the weight formats (``kernels``) and the configs, never
the converter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trt_gemma.config import GemmaConfig, QuantConfig
from trt_gemma.errors import CheckpointError, ConfigError
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight

ENGINE_FORMAT_VERSION = 1
ENGINE_JSON = "engine.json"
SHARD_BYTES = 2 << 30  # a shard is closed once the next weight would take it past this
TOKENIZER_DIR = "tokenizer"
# Copied from a tokenizer directory when present (an HF checkpoint dir also holds the weights).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
    "tokenizer_meta.json",  # GemmaTokenizer.save writes it beside tokenizer.json
)
_PARTS = {"int4": ("qweight", "scales", "zeros", "pre_quant_scale"),
          "fp8": ("weight", "weight_scale", "input_scale")}
_REQUIRED = {"int4": ("qweight", "scales"), "fp8": ("weight", "weight_scale")}

Weight = torch.Tensor | Int4Weight | Fp8Weight


def _prefix(name: str) -> str:
    return name.removesuffix(".weight")


def flatten_weight(name: str, value: Weight) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The stored tensors of one weight and its ``quantized`` record (None for a plain tensor)."""
    if isinstance(value, torch.Tensor):
        return {name: value}, None
    if isinstance(value, Int4Weight):
        record = {"format": "int4", "group_size": value.group_size}
    elif isinstance(value, Fp8Weight):
        record = {"format": "fp8"}
    else:
        raise TypeError(f"write_engine: {name} is a {type(value).__name__}, expected a tensor, "
                        "Int4Weight or Fp8Weight")
    return {f"{_prefix(name)}.{part}": t for part, t in value.tensors().items()}, record


def _assemble(name: str, record: dict, parts: dict[str, torch.Tensor], where: Path) -> Weight:
    fmt = record.get("format")
    if fmt not in _PARTS:
        raise CheckpointError(f"{where}: {name} has unknown quantized format {fmt!r}")
    for part in _REQUIRED[fmt]:
        if part not in parts:
            raise CheckpointError(f"{where}: quantized weight {name} lacks tensor "
                                  f"{_prefix(name)}.{part}")
    try:
        if fmt == "int4":
            return Int4Weight(qweight=parts["qweight"], scales=parts["scales"],
                              zeros=parts.get("zeros"), group_size=int(record["group_size"]),
                              pre_quant_scale=parts.get("pre_quant_scale"))
        return Fp8Weight(weight=parts["weight"], weight_scale=parts["weight_scale"],
                         input_scale=parts.get("input_scale"))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: quantized weight {name}: {e}") from None


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Engine:
    """A loaded engine.json; tensors stay on disk until asked for (treat the dicts as read-only)."""

    path: Path  # the engine directory
    config: GemmaConfig
    quant: QuantConfig
    profile: dict[str, Any] | None  # the build profile (batch/sequence limits...), if any
    metadata: dict[str, Any]  # the whole engine.json (built_with, created_utc, extra, files...)
    weight_map: dict[str, str]  # stored tensor name -> shard file name
    quantized: dict[str, dict[str, Any]]  # weight name -> {"format": "int4"|"fp8", ...}

    @property
    def tokenizer_files(self) -> tuple[Path, ...]:
        return tuple(self.path / f for f in self.metadata["tokenizer_files"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def shards(self) -> list[str]:
        return list(self.metadata["weights"]["shards"])

    @property
    def generation_config(self) -> dict[str, float | int]:
        """Sampling defaults recorded at build time ({} for a source without any)."""
        from trt_gemma.checkpoint.generation import parse_generation_config

        recorded = self.metadata.get("generation_config") or {}  # SamplingParams names = HF's
        return parse_generation_config(recorded, f"{self.path / ENGINE_JSON}: generation_config")

    def load_tokenizer(self):
        """The ``GemmaTokenizer`` saved in ``tokenizer/`` (by ``GemmaTokenizer.save``)."""
        from trt_gemma.tokenizer import GemmaTokenizer

        try:
            return GemmaTokenizer.load(self.tokenizer_dir)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.tokenizer_dir}: {e}") from None

    def _open(self, shard: str, device: str):
        try:
            return safe_open(self.path / shard, framework="pt", device=device)
        except Exception as e:  # safetensors raises its own error types
            msg = str(e).replace("\n", " ")
            raise CheckpointError(
                f"{self.path / shard}: unreadable safetensors file ({msg})"
            ) from None

    def load_tensor(self, name: str, device: str = "cpu") -> torch.Tensor:
        """One stored tensor by its stored name."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path / ENGINE_JSON}: no tensor named {name!r}")
        with self._open(self.weight_map[name], str(device)) as f:
            return f.get_tensor(name)

    def iter_tensors(self, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(stored name, tensor) for every stored tensor, one shard open at a time."""
        for shard in self.shards:
            yield from self._shard_tensors(shard, device)

    def iter_weights(self, device: str = "cpu") -> Iterator[tuple[str, Weight]]:
        """(weight name, tensor | Int4Weight | Fp8Weight): quantized weights reassembled."""
        owner: dict[str, tuple[str, str]] = {}  # stored name -> (weight name, part)
        for name, record in self.quantized.items():
            for part in _PARTS.get(record.get("format"), ()):
                owner[f"{_prefix(name)}.{part}"] = (name, part)
        for shard in self.shards:
            pending: dict[str, dict[str, torch.Tensor]] = {}
            for stored, tensor in self._shard_tensors(shard, device):
                if stored in owner:
                    name, part = owner[stored]
                    pending.setdefault(name, {})[part] = tensor
                else:
                    yield stored, tensor
            for name, parts in pending.items():
                yield name, _assemble(name, self.quantized[name], parts, self.path / shard)

    def _shard_tensors(self, shard: str, device: str) -> Iterator[tuple[str, torch.Tensor]]:
        with self._open(shard, str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)

    def load_weights(self, device: str = "cpu") -> dict[str, Weight]:
        return dict(self.iter_weights(device))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_files(root: Path, files: dict[str, Any], manifest: Path, verify: bool) -> None:
    """Every listed file exists inside root with its size; with verify, its sha256 too."""
    paths = {}
    for rel, entry in files.items():
        p = (root / rel).resolve()
        if Path(rel).is_absolute() or root.resolve() not in p.parents:
            raise CheckpointError(f"{manifest}: file entry {rel!r} points outside the engine")
        if not p.is_file():
            raise CheckpointError(f"{root / rel}: missing (listed in {ENGINE_JSON})")
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{root / rel}: {size} bytes, {ENGINE_JSON} expects "
                                  f"{entry['bytes']} (truncated or modified)")
        paths[rel] = p
    if not verify:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(paths)))) as pool:
        digests = dict(zip(paths, pool.map(_sha256, paths.values()), strict=True))
    for rel, digest in digests.items():
        if digest != files[rel]["sha256"]:
            raise CheckpointError(f"{root / rel}: sha256 mismatch, the file is corrupted or was "
                                  f"modified ({ENGINE_JSON} expects {files[rel]['sha256'][:12]}…, "
                                  f"found {digest[:12]}…)")


def read_engine(path: str | Path, verify: bool = True) -> Engine:
    """Read an engine directory; ``verify`` checks each file's sha256 (sizes are always checked)."""
    root = Path(path)
    manifest = root / ENGINE_JSON
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such engine directory")
    try:
        meta = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{manifest}: missing, {root} is not a trt-gemma engine") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest}: malformed JSON ({e})") from None
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise CheckpointError(f"{manifest}: no format_version, not a trt-gemma engine.json")
    version = meta["format_version"]
    if version != ENGINE_FORMAT_VERSION:
        raise CheckpointError(f"{manifest}: engine format version {version!r} is not supported "
                              f"(this trt-gemma reads version {ENGINE_FORMAT_VERSION}); rebuild "
                              "the engine with this version")
    try:
        config = GemmaConfig.from_dict(meta["config"])
        quant = QuantConfig.from_dict(meta["quant"])
        weights = meta["weights"]
        files = meta["files"]
        listed = [*weights["shards"], *meta["tokenizer_files"]]
        engine = Engine(path=root, config=config, quant=quant, profile=meta.get("profile"),
                        metadata=meta, weight_map=dict(weights["tensors"]),
                        quantized=dict(weights["quantized"]))
        for rel in listed:
            if rel not in files:
                raise CheckpointError(f"{manifest}: no checksum listed for {rel}")
        _check_files(root, files, manifest, verify)
    except KeyError as e:
        raise CheckpointError(f"{manifest}: missing field {e.args[0]!r}") from None
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest}: invalid engine description ({e})") from None
    return engine


def generation_defaults(source: str | Path) -> dict[str, float | int]:
    """The sampling defaults of any model source: an engine dir's recorded ones, an HF
    directory's generation_config.json, nothing for a .gguf file or a bundled name."""
    from trt_gemma.checkpoint.generation import read_generation_config

    path = Path(source)
    if (path / ENGINE_JSON).is_file():
        return read_engine(path, verify=False).generation_config
    if path.is_dir():
        return read_generation_config(path)
    return {}


# --------------------------------------------------------------------------------------------
# Writing


def _built_with() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("trt-gemma", "torch", "safetensors", "triton"):
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[dist] = importlib_metadata.version(dist)
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


def _tokenizer_sources(tokenizer: Any) -> list[Path]:
    if tokenizer is None or hasattr(tokenizer, "save"):
        return []
    if isinstance(tokenizer, (str, Path)) and Path(tokenizer).is_dir():
        found = [Path(tokenizer) / n for n in TOKENIZER_FILES if (Path(tokenizer) / n).is_file()]
        if not found:
            raise CheckpointError(f"{tokenizer}: no tokenizer files (expected one of "
                                  f"{', '.join(TOKENIZER_FILES)})")
        return found
    if isinstance(tokenizer, (str, Path)):
        tokenizer = [tokenizer]
    sources = [Path(p) for p in tokenizer]
    for p in sources:
        if not p.is_file():
            raise CheckpointError(f"{p}: tokenizer file not found")
    names = [p.name for p in sources]
    if len(set(names)) != len(names):
        raise CheckpointError(f"tokenizer files share a name: {sorted(names)}")
    return sources


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not overwrite:
        raise CheckpointError(f"{target}: already exists (pass overwrite=True to replace it)")
    if not target.is_dir() or (any(target.iterdir()) and not (target / ENGINE_JSON).is_file()):
        # Never delete something that is not an engine (a typo'd -o ~ must not cost a home dir).
        raise CheckpointError(f"{target}: exists and is not an engine directory; not replacing it")


class _ShardWriter:
    """Accumulates tensors and writes a safetensors shard whenever the next would overflow it."""

    def __init__(self, root: Path, shard_bytes: int) -> None:
        self.root, self.shard_bytes = root, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.nbytes for t in tensors.values())
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        for name, t in tensors.items():
            if name in self.weight_map or name in self.pending:
                raise ValueError(f"write_engine: tensor {name!r} given twice")
            t = t.detach().to("cpu").contiguous()
            # safetensors refuses views and tensors sharing storage (tied embeddings): copy them.
            if t.untyped_storage().nbytes() != t.nbytes or any(
                t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr()
                for o in self.pending.values()
            ):
                t = t.clone()
            self.pending[name] = t
        self.pending_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        shard = f"weights-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, self.root / shard, metadata={"format": "pt"})
        self.shards.append(shard)
        self.weight_map.update(dict.fromkeys(self.pending, shard))
        self.pending, self.pending_bytes = {}, 0


def write_engine(
    target_dir: str | Path,
    *,
    config: GemmaConfig,
    quant: QuantConfig,
    tensors: Mapping[str, Weight] | Iterable[tuple[str, Weight]],
    tokenizer: str | Path | Iterable[str | Path] | Any | None = None,
    profile: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    generation_config: dict[str, float | int] | None = None,
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> Engine:
    """Write an engine directory atomically and return it (read back without re-hashing).

    ``tokenizer``: a directory (its known tokenizer files are copied), a list of files, or an
    object with ``save(directory)`` such as ``GemmaTokenizer``. ``generation_config``: sampling
    defaults under SamplingParams names (``checkpoint.generation.read_generation_config``).

    ``tensors`` may be a generator: it is consumed once, streamed to disk shard by shard. If
    anything fails (the generator included) nothing appears at ``target_dir``, and with
    ``overwrite`` an existing engine stays as it was.
    """
    target = Path(target_dir)
    _check_target(target, overwrite)
    head = {"format_version": ENGINE_FORMAT_VERSION, "config": config.to_dict(),
            "quant": quant.to_dict(), "profile": profile,
            "generation_config": dict(generation_config or {})}
    try:  # fail before the long part if a dict will not serialise
        json.dumps({**head, "extra": extra})
    except (TypeError, ValueError) as e:
        raise ValueError(f"write_engine: profile, extra or quant.extra is not JSON: {e}") from None
    tok_sources = _tokenizer_sources(tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, shard_bytes)
        quantized: dict[str, dict] = {}
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        for name, value in items:
            stored, record = flatten_weight(name, value)
            if record is not None:
                quantized[name] = record
            writer.add(stored)
        writer.flush()
        tok_dir = tmp / TOKENIZER_DIR
        if hasattr(tokenizer, "save"):
            tokenizer.save(tok_dir)
        elif tok_sources:
            tok_dir.mkdir()
            for src in tok_sources:
                shutil.copyfile(src, tok_dir / src.name)
        tok_files = sorted(
            p.relative_to(tmp).as_posix() for p in tok_dir.rglob("*") if p.is_file()
        ) if tok_dir.is_dir() else []
        files = {}
        for rel in [*writer.shards, *tok_files]:
            with open(tmp / rel, "rb+") as f:
                os.fsync(f.fileno())  # on disk before the rename makes the engine visible
            files[rel] = {"sha256": _sha256(tmp / rel), "bytes": (tmp / rel).stat().st_size}
        meta = {**head, "tokenizer_files": tok_files,
                "weights": {"shards": writer.shards, "tensors": writer.weight_map,
                            "quantized": quantized},
                "files": files, "built_with": _built_with(),
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "extra": extra or {}}
        with open(tmp / ENGINE_JSON, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_engine(target, verify=False)


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    _check_target(target, overwrite)  # again: the build may have taken hours
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = target.with_name(f"{target.name}.old-{secrets.token_hex(4)}")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
