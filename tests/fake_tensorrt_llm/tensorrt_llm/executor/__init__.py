"""Real: tensorrt_llm/executor/__init__.py (GenerationResult, CompletionOutput from result.py)."""

from tensorrt_llm.executor.result import CompletionOutput, GenerationResult, RequestError

__all__ = ["CompletionOutput", "GenerationResult", "RequestError"]
