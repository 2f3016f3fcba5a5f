"""Fake ``tensorrt_llm`` (tests only; see ../README.md).

Real: tensorrt_llm/__init__.py exports ``SamplingParams`` (tensorrt_llm/sampling_params.py) and
``LLM``, which since 1.0 is the PyTorch-backend LLM (``tensorrt_llm.llmapi.llm._TorchLLM``); the
TensorRT-engine LLM is ``tensorrt_llm._tensorrt_engine.LLM``.
"""

from tensorrt_llm.llmapi.llm import _TorchLLM as LLM
from tensorrt_llm.sampling_params import SamplingParams

__version__ = "1.1.0+fake"

__all__ = ["LLM", "SamplingParams"]
