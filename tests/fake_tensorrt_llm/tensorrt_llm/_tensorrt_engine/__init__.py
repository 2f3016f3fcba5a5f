"""Real: tensorrt_llm/_tensorrt_engine/__init__.py, ``from tensorrt_llm.llmapi.llm import
_TrtLLM as LLM`` (the LLM that runs TensorRT engines built by trtllm-build)."""

from tensorrt_llm.llmapi.llm import _TrtLLM as LLM

__all__ = ["LLM"]
