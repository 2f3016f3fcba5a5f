"""The cost of guided decoding: output tokens/s without a constraint, with a JSON schema, with
json_object (same engine, same prompts, one run). See trt_gemma/bench/guided.py."""
import sys

from trt_gemma.bench.guided import main

if __name__ == "__main__":
    sys.exit(main())
