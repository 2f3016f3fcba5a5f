"""CLI subcommands of this package, registered into ``trt-gemma`` by trt_gemma/cli.py.

``trt-gemma build SOURCE -o ENGINE_DIR [...]``: the converter (see converter/engine.py).
``trt-gemma eval SOURCE_OR_ENGINE --text FILE [...]``: perplexity (see trt_gemma/eval.py); its
last line is ``perplexity: X``.

Choices (--quant, --backend, --dtype, --profile) are validated by ``BuildOptions`` rather than
argparse, so a wrong value is one line naming it (exit 2), like every other user error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from trt_gemma.errors import ConfigError

MIB = 1 << 20
BUNDLED_PREFIX = "bundled:"  # --text bundled:heldout.txt reads trt_gemma/data/heldout.txt


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build", help="convert (and quantize) a checkpoint into an engine directory",
        description="Checkpoint -> calibrate -> quantize -> engine directory (written atomically).")
    p.add_argument("source", help="bundled name (gemma3-270m), .gguf, HF dir, or an unquantized "
                                  "engine dir")
    p.add_argument("-o", "--output", required=True, help="engine directory to create")
    p.add_argument("--quant", default=None,
                   help="none | fp8 | int4-awq | int4 (default: the profile's choice, else none)")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="auto | fp8 (default: the profile's choice, else auto)")
    p.add_argument("--group-size", type=int, default=128, help="INT4 channels per scale")
    p.add_argument("--calib-text", default=None, help="calibration text file (default: bundled)")
    p.add_argument("--calib-tokens", type=int, default=40960, help="calibration tokens at most")
    p.add_argument("--refine-steps", type=int, default=40,
                   help="int4-awq: steps per layer fitting the INT4 scales so that each quantized "
                        "layer reproduces the float one on the calibration text (0: off)")
    p.add_argument("--distill-steps", type=int, default=90,
                   help="int4-awq: then steps fitting all INT4 scales at once so that the "
                        "quantized model's next-token distribution matches the float one's "
                        "on the calibration text (0: off)")
    p.add_argument("--profile", default=None,
                   help="rtx4090 | l4 | l40s | a100-80gb | h100-80gb | h200")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize the LM head too (stored apart from the embedding)")
    p.add_argument("--backend", default="native", help="native | tensorrt-llm")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensorrt-llm: tensor-parallel GPUs to split the checkpoint over "
                        "(one rank{r}.safetensors each)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing engine")
    p.add_argument("--device", default="auto",
                   help="where calibration and the quantization math run: auto (CUDA when "
                        "present), cpu, cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)

    p = subparsers.add_parser(
        "eval", help="perplexity of a model or engine on a text",
        description="Perplexity over the first N tokens (BOS + text), one forward per window.")
    p.add_argument("source", help="bundled name, .gguf, HF dir or engine dir")
    p.add_argument("--text", required=True,
                   help=f"UTF-8 text file ({BUNDLED_PREFIX}heldout.txt: the bundled held-out text)")
    p.add_argument("--max-tokens", type=int, default=None, help="score the first N tokens only")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per forward pass (default: the model's context)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--no-verify", action="store_true", help="skip engine checksum verification")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    from trt_gemma.distributed.flags import add_tensor_parallel_argument

    add_tensor_parallel_argument(p)
    p.set_defaults(func=cmd_eval)


# build ---------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / MIB:,.1f} MiB"


def cmd_build(args: argparse.Namespace) -> int:
    from trt_gemma.converter.engine import BuildOptions, build_engine

    options = BuildOptions(
        quant=args.quant, kv_cache_dtype=args.kv_cache_dtype, group_size=args.group_size,
        calib_text=args.calib_text, calib_tokens=args.calib_tokens, profile=args.profile,
        refine_steps=args.refine_steps, distill_steps=args.distill_steps,
        dtype=args.dtype, quantize_lm_head=args.quantize_lm_head, backend=args.backend,
        tp_size=args.tp_size, overwrite=args.overwrite, device=args.device,
    )
    progress = not args.no_progress and sys.stderr.isatty()
    result = build_engine(args.source, args.output, options, progress=progress,
                          log=lambda m: print(m, flush=True))
    q = result.quant
    print(f"built {result.output} ({args.backend}): quant {q.mode}, kv-cache {q.kv_cache_dtype}, "
          f"dtype {args.dtype}" + (f", group size {q.group_size}" if "int4" in q.mode else ""))
    ratio = result.weight_file_bytes / max(result.dense_bytes, 1)
    print(f"size: source {_mib(result.source_bytes)} on disk; weights at {args.dtype} "
          f"{_mib(result.dense_bytes)} -> {_mib(result.weight_file_bytes)} ({ratio:.2f}x); "
          f"{_mib(result.output_bytes)} written in all (with tokenizer)")
    if result.limits is not None:
        lim = result.limits
        print(f"profile {lim.profile} ({lim.gpu}): max batch {lim.max_batch_size}, max input "
              f"{lim.max_input_len}, max seq {lim.max_seq_len}, max tokens/step "
              f"{lim.max_num_tokens}, KV budget {lim.kv_budget_bytes / (1 << 30):.1f} GiB")
    lines = result.report.per_layer_lines()
    if lines:
        print("per-layer scales:")
        for line in lines:
            print("  " + line)
    if result.calibration:
        c = result.calibration
        print(f"calibration: {c['num_tokens']} tokens of {c['text']}")
    if args.backend == "tensorrt-llm":
        import shlex

        from trt_gemma import trtllm_layout as layout

        engine_dir = result.output / layout.ENGINE_DIR
        if result.trtllm_built:
            print(f"TensorRT-LLM engine built in {engine_dir}")
        else:
            print("TensorRT-LLM is not installed here (no tensorrt_llm / trtllm-build), so only "
                  "the checkpoint was written. To build the engine on a machine that has it, run:")
            print("  " + shlex.join(result.trtllm_command))
        settings = layout.read_export(result.output)["runtime"]
        for line in layout.runner_hint(settings, engine_dir, result.output / layout.TOKENIZER_DIR,
                                       tp_size=args.tp_size):
            print(line)
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"time: {times}")
    return 0


# eval ----------------------------------------------------------------------------------------


def read_text(spec: str) -> str:
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX):]
        res = resources.files("trt_gemma").joinpath("data", name)
        if not res.is_file():
            raise ConfigError(f"--text {spec}: no bundled text {name!r} (calibration.txt, "
                              "heldout.txt)")
        return res.read_text("utf-8")
    path = Path(spec)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: text file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e})") from None


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from trt_gemma.eval import perplexity, text_ids
    from trt_gemma.loader import load_model

    if args.max_tokens is not None and args.max_tokens < 2:
        raise ConfigError(f"--max-tokens must be >= 2 (BOS + one token), got {args.max_tokens}")
    from trt_gemma.distributed.flags import tensor_parallel_size

    size = tensor_parallel_size(args)
    text = read_text(args.text)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    if size > 1:  # every rank scores its shard (SPMD); rank 0's result
        from trt_gemma.distributed.eval_ranks import EvalJob, tensor_parallel_perplexity

        job = EvalJob(str(args.source), text, args.dtype, device, not args.no_verify,
                      args.max_tokens, args.window)
        result, dtype = tensor_parallel_perplexity(job, size, args.tensor_parallel_timeout)
    else:
        model, tokenizer = load_model(args.source, dtype=args.dtype, device=device,
                                      verify=not args.no_verify)
        ids = text_ids(tokenizer, text, args.max_tokens)
        result = perplexity(model, ids, tokenizer.bos_id, window=args.window)
        dtype = model.dtype
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"source": str(args.source), "text": args.text, **result.to_dict(),
                          "dtype": str(dtype).removeprefix("torch."),
                          "tensor_parallel_size": size, "seconds": round(elapsed, 2)}))
        return 0
    print(f"tokens: {result.num_tokens} (BOS + text), {result.num_windows} window(s) of at most "
          f"{result.window}, {result.num_predicted} predicted")
    print(f"mean nll: {result.mean_nll:.4f} nats/token  [{elapsed:.1f} s]")
    print(f"perplexity: {result.perplexity:.4f}")
    return 0
