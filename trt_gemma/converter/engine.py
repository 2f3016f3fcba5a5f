"""The converter: checkpoint (or unquantized engine) -> calibrate -> quantize -> engine directory.

``build_engine`` is what ``trt-gemma build`` runs. Steps, each timed for the summary:

1. open the source (bundled name, .gguf, HF dir, or an unquantized engine dir) and read every
   tensor (checked for NaN/Inf: a corrupted download is named, not quantized);
2. resolve the build profile, if any: it picks the quant mode and KV dtype unless given, and
   the batch/sequence/token limits stored in engine.json (see ``profiles.py``);
3. calibrate when the mode needs it (FP8 activation scales, AWQ, FP8 KV-cache scales) on the
   bundled calibration text or ``--calib-text``;
4. quantize layer by layer, streaming into ``engine_dir.write_engine`` (atomic: an error, Ctrl-C
   or a kill leaves nothing at the target) or, with ``backend="tensorrt-llm"``, into a
   TensorRT-LLM checkpoint (``trtllm.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from trt_gemma.converter.profiles import BuildLimits, get_profile, resolve_profile
from trt_gemma.converter.quantize import (
    QuantReport,
    needs_calibration,
    output_config,
    quantize_tensors,
)
from trt_gemma.config import GemmaConfig, QuantConfig
from trt_gemma.errors import CheckpointError, ConfigError
from trt_gemma.quant.distill import DistillOptions
from trt_gemma.quant.refine import RefineOptions

BACKENDS = ("native", "tensorrt-llm")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# In trt_gemma/data/, original text in many genres (see its README), joined: about 34k Gemma
# tokens. Every int4-awq stage fits what it is calibrated on, so more and more varied text
# lowered the cost on unseen text (docs/quantization.md).
DEFAULT_CALIB_TEXTS = ("calibration.txt", "calibration_more.txt", "calibration_encyclopedia.txt",
                       "calibration_news.txt", "calibration_fiction.txt",
                       "calibration_science_tech.txt", "calibration_conversational.txt",
                       "calibration_essays.txt")


@dataclass(frozen=True)
class BuildOptions:
    """Everything ``trt-gemma build`` takes besides SOURCE and -o; validated on creation."""

    quant: str | None = None  # none | fp8 | int4-awq | int4; None: the profile's choice, else none
    kv_cache_dtype: str | None = None  # auto | fp8; None: the profile's, else auto
    group_size: int = 128  # INT4 input channels per scale
    calib_text: str | None = None  # text file; None: the bundled calibration text
    calib_tokens: int = 40960  # calibration tokens at most (BOS of each window included)
    calib_window: int = 512  # tokens per calibration forward pass
    calib_rows: int = 1024  # input rows per linear group kept for the AWQ search
    refine_steps: int = 40  # int4-awq: steps per layer fitting scales to the float layer; 0: off
    distill_steps: int = 90  # int4-awq: then steps fitting all scales to the float model's output
    profile: str | None = None  # a name in profiles.PROFILES
    dtype: str = "bfloat16"  # activation dtype: dense weights and INT4 scales are stored in it
    quantize_lm_head: bool = False  # quantize the (tied) LM head too, as a separate weight
    backend: str = "native"  # native engine dir | TensorRT-LLM checkpoint (+ trtllm-build)
    tp_size: int = 1  # tensorrt-llm: tensor-parallel ranks (one rank{r}.safetensors each)
    overwrite: bool = False  # replace an existing engine at the target
    # Where calibration and the quantization math run; auto: CUDA when present (the int4-awq
    # scale refits take ~1 h on a 2-core CPU and minutes on a GPU).
    device: str = "auto"

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def __post_init__(self) -> None:
        QuantConfig(mode=self.quant or "none", group_size=self.group_size,
                    kv_cache_dtype=self.kv_cache_dtype or "auto")  # raises ConfigError
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown --backend {self.backend!r}; expected one of {BACKENDS}")
        if self.tp_size < 1:
            raise ConfigError(f"--tp-size must be >= 1, got {self.tp_size}")
        if self.tp_size > 1 and self.backend != "tensorrt-llm":
            raise ConfigError("--tp-size needs --backend tensorrt-llm (the native engine runs on "
                              "one GPU)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown --dtype {self.dtype!r}; expected one of {list(DTYPES)}")
        for name in ("calib_tokens", "calib_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("refine_steps", "distill_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        if self.calib_window < 2:
            raise ConfigError("calibration window must be >= 2 tokens")
        if self.profile is not None:
            get_profile(self.profile)  # raises ConfigError naming the known profiles
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"unknown --device {self.device!r}; expected auto, cpu or "
                                  "cuda[:N]") from None


@dataclass
class BuildResult:
    output: Path
    config: GemmaConfig
    quant: QuantConfig
    source_bytes: int  # the source on disk
    dense_bytes: int  # its weights at --dtype, unquantized
    output_bytes: int  # what was written (weights, tokenizer, metadata)
    weight_file_bytes: int = 0  # the weight files alone (safetensors shards)
    seconds: dict[str, float] = field(default_factory=dict)
    report: QuantReport = field(default_factory=QuantReport)
    limits: BuildLimits | None = None
    calibration: dict[str, Any] | None = None
    trtllm_command: list[str] | None = None
    trtllm_built: bool = False


# Sources -----------------------------------------------------------------------------------


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def open_source(source: str | Path) -> tuple[GemmaConfig, dict[str, torch.Tensor], Any, int]:
    """(config, canonical dense tensors, tokenizer, bytes on disk) of a checkpoint or engine."""
    from trt_gemma.loader import is_engine_dir

    if is_engine_dir(source):
        from trt_gemma.engine_dir import read_engine

        engine = read_engine(source)
        if engine.quant.mode != "none" or engine.quantized:
            raise CheckpointError(
                f"{source}: engine is already quantized ({engine.quant.mode}); build from the "
                "original checkpoint (or an engine built with --quant none)"
            )
        weights = {n: t for n, t in engine.iter_weights()
                   if not n.endswith(("self_attn.k_scale", "self_attn.v_scale"))}
        return engine.config, weights, engine.load_tokenizer(), _dir_bytes(engine.path)
    from trt_gemma.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(source)
    try:
        tokenizer = checkpoint.load_tokenizer()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{checkpoint.path}: cannot read its tokenizer ({e})") from None
    weights = dict(checkpoint.tensors())
    return checkpoint.config, weights, tokenizer, _dir_bytes(checkpoint.path)


def calibration_text(path: str | None) -> tuple[str, str]:
    """(text, a name for it) of --calib-text or the bundled calibration text."""
    if path is None:
        data = resources.files("trt_gemma").joinpath("data")
        text = "\n\n".join(data.joinpath(n).read_text("utf-8") for n in DEFAULT_CALIB_TEXTS)
        return text, "bundled:" + "+".join(DEFAULT_CALIB_TEXTS)
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8"), str(p)
    except FileNotFoundError:
        raise ConfigError(f"{p}: calibration text not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ConfigError(f"{p}: not a UTF-8 text file ({e})") from None


def leftover_partial_builds(target: Path) -> list[Path]:
    """Temporary dirs of builds killed mid-way (``kill -9`` leaves them beside the target)."""
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f"{target.name}.tmp-*"))


# The build ---------------------------------------------------------------------------------


def _bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False,
                dynamic_ncols=True)


def _calibrate(config, weights, tokenizer, quant, options, progress, log):
    from trt_gemma.quant.calibrate import calibrate, calibration_windows, linear_groups

    text, name = calibration_text(options.calib_text)
    ids = tokenizer.encode(text)
    windows = calibration_windows(ids, tokenizer.bos_id, options.calib_window, options.calib_tokens)
    n = sum(len(w) for w in windows)
    if n < 32:
        raise ConfigError(f"{name}: only {n} calibration tokens; give a longer --calib-text")
    if any(t >= config.vocab_size for w in windows for t in w):
        raise ConfigError(f"{name}: the tokenizer produced ids beyond the model's vocab "
                          f"({config.vocab_size}); tokenizer and weights do not match")
    device = torch.device(options.resolved_device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    groups = linear_groups(config, lm_head=quant.quantize_lm_head and quant.mode != "none")
    with _bar(n, "calibrating", "tok", progress) as bar:
        stats = calibrate(config, weights, windows, groups=groups, max_rows=options.calib_rows,
                          dtype=dtype, device=device, progress=bar.update)
    info = {"text": name, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            **stats.summary()}
    log(f"calibrated on {n} tokens of {name} ({len(windows)} windows)")
    return stats, info


def build_engine(
    source: str | Path,
    output: str | Path,
    options: BuildOptions = BuildOptions(),  # noqa: B008 (frozen, never mutated)
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BuildResult:
    """Build an engine (or a TensorRT-LLM checkpoint) from ``source`` at ``output``."""
    output = Path(output)
    if output.exists() and not options.overwrite:
        raise CheckpointError(f"{output}: already exists (pass --overwrite to replace it)")
    if options.backend == "tensorrt-llm" and options.quantize_lm_head:
        raise ConfigError("--quantize-lm-head is not supported with --backend tensorrt-llm "
                          "(TensorRT-LLM leaves lm_head out of quantization)")
    for stale in leftover_partial_builds(output):
        log(f"note: {stale} is left from an interrupted build; it is safe to delete")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    config, weights, tokenizer, source_bytes = open_source(source)
    from trt_gemma.engine_dir import generation_defaults

    generation = generation_defaults(source)  # before the long part: a bad file fails now
    dtype = DTYPES[options.dtype]
    dense_bytes = sum(t.numel() for t in weights.values()) * dtype.itemsize
    seconds["load"] = time.perf_counter() - t0

    limits = None
    mode, kv = options.quant, options.kv_cache_dtype
    if options.profile is not None:
        limits = resolve_profile(get_profile(options.profile), config, quant=mode,
                                 kv_cache_dtype=kv, group_size=options.group_size,
                                 quantize_lm_head=options.quantize_lm_head)
        mode, kv = limits.quant, limits.kv_cache_dtype
    quant = QuantConfig(mode=mode or "none", group_size=options.group_size,
                        kv_cache_dtype=kv or "auto", quantize_lm_head=options.quantize_lm_head)
    if options.backend == "tensorrt-llm":  # refuse before the long part, not after it
        from trt_gemma.converter.trtllm import check_exportable

        check_exportable(config, quant, options.tp_size)

    stats, calib_info = None, None
    if needs_calibration(quant):
        t = time.perf_counter()
        stats, calib_info = _calibrate(config, weights, tokenizer, quant, options, progress, log)
        seconds["calibrate"] = time.perf_counter() - t
    extra: dict[str, Any] = {"dtype": options.dtype}
    if calib_info is not None:
        extra["calibration"] = calib_info
    if quant.mode == "int4-awq":
        extra["refine_steps"] = options.refine_steps
        extra["distill_steps"] = options.distill_steps
    quant = dataclasses.replace(quant, extra=extra)
    out_config = output_config(config, quant)
    report = QuantReport()

    t = time.perf_counter()
    n_layers = config.num_hidden_layers
    # Distillation starts from the hidden states the layer-wise refiner carries, so it runs the
    # refiner even at 0 refine steps (then only to carry them).
    refine = (RefineOptions(steps=options.refine_steps)
              if options.refine_steps or options.distill_steps else None)
    distill = DistillOptions(steps=options.distill_steps) if options.distill_steps else None
    with _bar(n_layers, f"quantizing ({quant.mode}) + writing", "layer", progress) as bar:
        tensors = quantize_tensors(config, weights, quant, stats, dtype, report,
                                   source=str(source), on_layer=lambda: bar.update(1),
                                   device=options.resolved_device, refine=refine, distill=distill)
        result = BuildResult(output=output, config=out_config, quant=quant,
                             source_bytes=source_bytes, dense_bytes=dense_bytes, output_bytes=0,
                             report=report, limits=limits, calibration=calib_info)
        if options.backend == "native":
            _write_native(output, out_config, quant, tensors, tokenizer, limits, options,
                          generation)
        else:
            _write_trtllm(output, out_config, quant, tensors, tokenizer, limits, options, dtype,
                          result, log)
    seconds["quantize+write"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    result.seconds = seconds
    result.output_bytes = _dir_bytes(output)
    result.weight_file_bytes = sum(p.stat().st_size for p in output.rglob("*.safetensors"))
    return result


def _write_native(output, config, quant, tensors: Iterator, tokenizer, limits, options,
                  generation: dict) -> None:
    from trt_gemma.engine_dir import write_engine

    write_engine(
        output, config=config, quant=quant, tensors=tensors, tokenizer=tokenizer,
        profile=limits.to_dict() if limits is not None else None,
        extra={"builder": "trt-gemma build", "backend": "native"},
        generation_config=generation,
        overwrite=options.overwrite,
    )


def _write_trtllm(output, config, quant, tensors: Iterator, tokenizer, limits, options, dtype,
                  result: BuildResult, log) -> None:
    from trt_gemma.converter import trtllm

    command, built = trtllm.export_and_build(
        output, config=config, quant=quant, weights=dict(tensors), tokenizer=tokenizer,
        limits=limits, dtype=dtype, tp_size=options.tp_size, overwrite=options.overwrite,
        log=log,
    )
    result.trtllm_command, result.trtllm_built = command, built
