"""The serving runtime: paged KV cache, scheduler, batched sampler, LLMEngine and AsyncLLMEngine."""

from trt_gemma.runtime.async_engine import AsyncLLMEngine, EngineDeadError
from trt_gemma.runtime.config import EngineConfig
from trt_gemma.runtime.engine import EngineStats, LLMEngine

__all__ = ["AsyncLLMEngine", "EngineConfig", "EngineDeadError", "EngineStats", "LLMEngine"]
