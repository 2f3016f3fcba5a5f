"""Real: tensorrt_llm/llmapi/__init__.py exports ``KvCacheConfig`` (from llm_args.py) and
``LLM`` (the PyTorch-backend one since 1.0)."""

from tensorrt_llm.llmapi.llm import _TorchLLM as LLM
from tensorrt_llm.llmapi.llm_args import KvCacheConfig

__all__ = ["KvCacheConfig", "LLM"]
