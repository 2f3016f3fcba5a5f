"""Online serving benchmark against any OpenAI-compatible server: the old entry point of
``trt-gemma bench serve`` (trt_gemma/bench/serve.py holds the measurement), with its defaults:
--url http://127.0.0.1:8000, --concurrency 1,4,8, and the PNG beside --out.

    trt-gemma serve gemma3-270m --port 8000 &
    python benchmarks/serving.py --url http://127.0.0.1:8000 --concurrency 1,4,8 \\
        --out benchmarks/results/serving_cpu_gemma3-270m.json
"""

from __future__ import annotations

import argparse
import os
import sys

from trt_gemma.bench.serve import add_arguments, run
from trt_gemma.errors import TrtGemmaError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p, standalone=True)
    args = p.parse_args(argv)
    if args.output_json and args.plot is None:
        args.plot = os.path.splitext(args.output_json)[0] + ".png"
    try:
        return run(args)
    except TrtGemmaError as e:
        print(f"serving.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
