"""trt-gemma: an optimised inference runtime for Google's Gemma models.

The offline API mirrors vLLM's: ``LLM(source).generate(prompts, SamplingParams(...))``.
"""

from trt_gemma import cpu_env

cpu_env.bounded_spin_wait()  # before anything below imports torch (see cpu_env.py)

from trt_gemma.llm import LLM  # noqa: E402
from trt_gemma.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
