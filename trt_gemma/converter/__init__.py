"""The converter: checkpoint -> (calibrate, quantize) -> engine dir or TensorRT-LLM checkpoint.

``engine.build_engine`` is the entry point (``trt-gemma build``); ``profiles`` holds the per-GPU
build recipes, ``quantize`` the per-layer quantization, ``trtllm`` the TensorRT-LLM export. Kept
empty of imports so registering the CLI subcommands stays cheap.
"""
