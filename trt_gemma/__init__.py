"""trt-gemma: an optimised inference runtime for Google's Gemma models.

The offline API mirrors vLLM's: ``LLM(source).generate(prompts, SamplingParams(...))``.
"""

from trt_gemma.llm import LLM
from trt_gemma.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
