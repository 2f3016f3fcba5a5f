"""The ``trt-gemma`` command: generate | info here; build | eval, serve, bench from their packages.

Each package that owns a command exposes ``add_commands(subparsers)`` (see COMMAND_MODULES), so the
converter and the server add their subcommands without this module importing their code up front.

User errors (bad paths, malformed checkpoints, invalid options) print one line and exit 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from trt_gemma.errors import TrtGemmaError

EXIT_USER_ERROR = 2
COMMAND_MODULES = ("trt_gemma.converter.commands", "trt_gemma.server.commands",
                   "trt_gemma.bench.commands", "trt_gemma.responsible.commands")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k")
    p.add_argument("--seed", type=int, default=None)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="bundled name (gemma3-270m), .gguf file, HF dir or engine dir")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-verify", action="store_true", help="skip engine checksum verification")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_generate(args: argparse.Namespace) -> int:
    from trt_gemma.llm import LLM
    from trt_gemma.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )
    from trt_gemma.distributed.flags import tensor_parallel_options
    from trt_gemma.runtime.speculative.flags import speculative_options

    llm = LLM(args.source, dtype=args.dtype, device=args.device, verify=not args.no_verify,
              kv_cache_dtype=args.kv_cache_dtype, **speculative_options(args),
              **tensor_parallel_options(args))
    try:  # with -tp > 1: stop the other ranks however generation ends
        prompt = args.prompt
        if args.chat:
            prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        start = time.perf_counter()
        if not args.quiet:
            print(args.prompt if not args.chat else "", end="", flush=True)
        for piece in llm.stream(prompt, params):
            print(piece, end="", flush=True)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
    print()
    if not args.quiet:
        print(f"[{elapsed:.2f} s]", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from trt_gemma.loader import is_engine_dir

    if is_engine_dir(args.source):
        from trt_gemma.engine_dir import read_engine

        engine = read_engine(args.source, verify=not args.no_verify)
        config, extra = engine.config, {"quant": engine.quant.to_dict()}
    else:
        from trt_gemma.checkpoint import open_checkpoint

        checkpoint = open_checkpoint(args.source)
        config, extra = checkpoint.config, {"path": str(checkpoint.path)}
    info = {
        "architecture": config.architecture,
        "parameters": config.num_parameters(),
        "bf16_weight_bytes": 2 * config.num_parameters(),
        "kv_bytes_per_token_bf16": config.kv_bytes_per_token(2),
        **extra,
        "config": config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"architecture   {config.architecture}")
    print(f"parameters     {config.num_parameters() / 1e6:.1f} M")
    print(f"bf16 weights   {2 * config.num_parameters() / 2**20:.1f} MiB")
    print(f"kv per token   {config.kv_bytes_per_token(2) / 1024:.1f} KiB (bf16)")
    for key, value in config.to_dict().items():
        if key != "layer_types":
            print(f"  {key:<26} {value}")
    sliding = sum(config.is_sliding(i) for i in range(config.num_hidden_layers))
    print(f"  {'layers':<26} {sliding} sliding, {config.num_hidden_layers - sliding} global")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trt-gemma", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text, streaming it to the terminal")
    _add_model_args(p)
    p.add_argument("prompt")
    _add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template")
    p.add_argument("--quiet", action="store_true", help="print only the generated text")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="auto: FP8 on CUDA for engines built with --kv-cache-dtype fp8, else the "
                        "model's dtype; fp8: always; model: never FP8")
    from trt_gemma.runtime.speculative.flags import add_speculative_arguments

    add_speculative_arguments(p)
    from trt_gemma.distributed.flags import add_tensor_parallel_argument

    add_tensor_parallel_argument(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="config, parameter count and sizes of a model or engine")
    p.add_argument("source")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    p.set_defaults(func=cmd_info)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrtGemmaError as e:
        print(f"trt-gemma: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("trt-gemma: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
