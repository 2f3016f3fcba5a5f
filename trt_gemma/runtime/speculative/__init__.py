"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and exact verification.

Drafts are verified inside the engine's own step (one target forward, packed with the step's
other decodes and prefill chunks), not in a second engine loop: see ``LLMEngine.step``.
"""

from trt_gemma.runtime.speculative.draft import DraftProposer
from trt_gemma.runtime.speculative.ngram import NgramProposer, propose_ngram
from trt_gemma.runtime.speculative.speculator import Speculator
from trt_gemma.runtime.speculative.verify import RowView, accept_greedy, verify

__all__ = ["DraftProposer", "NgramProposer", "RowView", "Speculator", "accept_greedy",
           "propose_ngram", "verify"]
