"""Errors a user can cause. The CLI prints them as one line and exits non-zero, without a traceback.

Every message names the file, tensor, field or argument that is wrong and what was expected.
"""


class TrtGemmaError(Exception):
    """Base of every user-facing error."""


class ConfigError(TrtGemmaError, ValueError):
    """A config (model, quantization, sampling, CLI option) is invalid."""


class CheckpointError(TrtGemmaError, ValueError):
    """A checkpoint or engine on disk is missing, malformed, truncated or not a Gemma model."""


class RequestError(TrtGemmaError, ValueError):
    """A request cannot be served as given (e.g. the prompt is longer than the context)."""
