"""``trt-gemma watermark detect``, and the serve flags of responsible generation.

Imports stay light here (argparse only): the CLI builds every parser on each run.

``watermark detect --config FILE TEXT_OR_FILE...`` scores each argument (a file's contents where
the argument names a file, else the argument itself) with the SynthID-Text config in FILE,
tokenized by ``--model``'s tokenizer (default gemma3-270m; only the tokenizer is loaded), without
BOS. It prints one line per input, or JSON with --json; the keys are never printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SCREEN_MODES = ("prompts", "responses", "both")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("watermark", help="SynthID-Text watermark tools")
    sub = p.add_subparsers(dest="watermark_command", required=True)
    d = sub.add_parser("detect", help="score texts for a SynthID-Text watermark")
    d.add_argument("inputs", nargs="+", metavar="TEXT_OR_FILE")
    d.add_argument("--config", required=True, metavar="FILE",
                   help="the watermark config JSON the text was generated with")
    d.add_argument("--model", default="gemma3-270m", metavar="SOURCE",
                   help="whose tokenizer to use: bundled name, .gguf, HF dir or engine dir")
    d.add_argument("--json", action="store_true", help="one JSON object per input")
    d.set_defaults(func=cmd_detect)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """serve's flags for watermarking and screening (server/responsible.py reads them)."""
    group = parser.add_argument_group("responsible generation (SynthID-Text, safety screening)")
    group.add_argument("--watermark-config", default=None, metavar="FILE",
                       help="SynthID-Text: a JSON of keys, ngram_len, sampling_table_size, "
                            "sampling_table_seed, context_history_size (transformers' fields); "
                            "watermarks generated text and serves POST /v1/watermark/detect")
    group.add_argument("--safety-model", default=None, metavar="SOURCE|self",
                       help="screen with this Gemma classifier in ShieldGemma's format (a source "
                            "as for serve, e.g. a ShieldGemma checkpoint), or 'self' for the "
                            "served model")
    group.add_argument("--safety-policy", default=None, metavar="FILE",
                       help="policy text (or JSON with 'prompt' and 'response' texts); default: "
                            "ShieldGemma's four harm types")
    group.add_argument("--screen", choices=SCREEN_MODES, default="both",
                       help="what --safety-model screens (default both)")
    group.add_argument("--safety-threshold", type=float, default=0.5, metavar="P",
                       help="flag when P(Yes) > P (default 0.5; 0 flags all, 1 none)")
    group.add_argument("--safety-stream-tokens", type=int, default=32, metavar="N",
                       help="streaming: release text after every N tokens that passed screening")


def _load_tokenizer(source: str):
    from trt_gemma.loader import is_engine_dir

    if is_engine_dir(source):
        from trt_gemma.engine_dir import read_engine

        return read_engine(source, verify=False).load_tokenizer()
    from trt_gemma.checkpoint import open_checkpoint

    return open_checkpoint(source).load_tokenizer()


def _read_input(arg: str) -> tuple[str, str]:
    """(name to print, text): a file's path and contents, or the start of the text and itself."""
    path = Path(arg)
    try:
        if path.is_file():
            return arg, path.read_text(encoding="utf-8")
    except OSError:  # a long text is not a path
        pass
    short = " ".join(arg.split())
    return (short if len(short) <= 40 else short[:37] + "..."), arg


def cmd_detect(args: argparse.Namespace) -> int:
    from trt_gemma.responsible.detect import detect
    from trt_gemma.responsible.synthid import WatermarkConfig, Watermarker

    watermarker = Watermarker(WatermarkConfig.from_json(args.config))
    tokenizer = _load_tokenizer(args.model)
    eos = sorted(tokenizer.stop_token_ids)
    for arg in args.inputs:
        name, text = _read_input(arg)
        result = detect(watermarker, tokenizer.encode(text, add_bos=False), eos_token_ids=eos)
        if args.json:
            print(json.dumps({"input": name, **result.to_dict()}))
        else:
            print(f"{name}: score {result.score:.4f} (mean g {result.mean_score:.4f}) over "
                  f"{result.num_scored_tokens} tokens, z {result.z_score:.2f}, "
                  f"p-value {result.p_value:.3g}")
    return 0
