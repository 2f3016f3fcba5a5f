"""Guided decoding (structured outputs) with xgrammar: constrain what a request may generate.

- ``tokenizer_info``: the vocabulary as xgrammar reads it (bytes of every token, stop ids, the
  logits width);
- ``compiler``: StructuredOutputsParams -> compiled grammar, cached per engine, GrammarError for
  whatever does not compile;
- ``matcher``: one GrammarState per sequence, advanced on every token, and the per-step token
  bitmask the sampler applies.

xgrammar itself is imported on first use (it takes seconds), so engines that never see a
constraint never pay for it.
"""

from trt_gemma.guided.compiler import GrammarCompiler, GrammarError, canonical
from trt_gemma.guided.matcher import GrammarState, GrammarViolation, mask_logits, unpack_bitmask
from trt_gemma.guided.tokenizer_info import tokenizer_info

__all__ = ["GrammarCompiler", "GrammarError", "GrammarState", "GrammarViolation", "canonical",
           "mask_logits", "tokenizer_info", "unpack_bitmask"]
