"""trt-gemma: an optimised inference runtime for Google's Gemma models.

The offline API mirrors vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``,
``LLM.chat(messages)``, and ``SamplingParams(structured_outputs=StructuredOutputsParams(...))``
for guided decoding.
"""

from trt_gemma import cpu_env

cpu_env.bounded_spin_wait()  # before anything below imports torch (see cpu_env.py)

from trt_gemma.llm import LLM  # noqa: E402
from trt_gemma.sampling_params import (  # noqa: E402
    GuidedDecodingParams,
    SamplingParams,
    StructuredOutputsParams,
)

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "GuidedDecodingParams"]
__version__ = "0.1.0"
