"""TensorRT-LLM runtime backend: serve a TensorRT engine behind our server and LLM API.

``detect.py`` recognises a TensorRT-LLM source without importing TensorRT-LLM; ``params.py``
maps our SamplingParams onto TensorRT-LLM's; ``engine.py`` is the AsyncLLMEngine-shaped adapter
(the only module that imports ``tensorrt_llm``, and only when an engine is loaded).
"""

from trt_gemma.trtllm_runtime.detect import TrtllmSource, find_trtllm_source

__all__ = ["TrtllmSource", "find_trtllm_source"]
