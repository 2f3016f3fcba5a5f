"""SamplingParams: how one request is decoded. Shaped like vLLM's so users feel at home.

Validated once, at construction: every error names the field and the allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trt_gemma.errors import ConfigError
from trt_gemma.responsible.synthid import WatermarkConfig

MAX_LOGPROBS = 20  # the most top-N logprobs a request may ask for (OpenAI's cap too)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on what a request may generate (vLLM's name and fields): exactly one of them.

    Only the description lives here, checked for shape; trt_gemma/guided/ compiles it with
    xgrammar (a schema or grammar that does not compile is refused there, naming the problem).
    """

    json: str | dict | None = None  # a JSON schema (a dict, or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # exactly one of these strings
    grammar: str | None = None  # EBNF (xgrammar's dialect, a superset of GBNF)
    # JSON (json, json_object) options. strict (OpenAI's json_schema.strict; xgrammar's
    # strict_mode): an object has no properties and an array no items beyond those its schema
    # names; False: JSON Schema's defaults (extra ones allowed unless the schema forbids them).
    strict: bool = True
    disable_any_whitespace: bool = False  # compact JSON: no whitespace between tokens (vLLM's)

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ConfigError("StructuredOutputsParams.choice must be non-empty strings")
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ConfigError("StructuredOutputsParams takes exactly one of json, json_object, "
                              f"regex, choice, grammar; got {given or 'none'}")

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        kinds = ("json", "regex", "choice", "grammar")
        return next(n for n in kinds if getattr(self, n) is not None)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens (0 or -1 = all)
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely)
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # subtracted once from logits of tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever the batch
    max_tokens: int = 16  # tokens to generate at most
    min_tokens: int = 0  # stop conditions are ignored until this many tokens were generated
    stop: tuple[str, ...] = ()  # stop strings; the text ends before them (never emitted)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens (besides the model's eos ids)
    ignore_eos: bool = False  # keep generating past eos (benchmarks)
    logprobs: int | None = None  # logprob of the sampled token plus this many top alternatives
    prompt_logprobs: int | None = None  # reserved: not computed yet (rejected when set)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # guided decoding (trt_gemma/guided/)
    # SynthID-Text watermark (trt_gemma/responsible/synthid.py): None follows the engine's
    # (EngineConfig.watermark), a WatermarkConfig watermarks with it, False opts out. Its keys
    # never show in repr. The server never sets it from a request body.
    watermark: WatermarkConfig | bool | None = None
    extra: dict = field(default_factory=dict, compare=False)  # passthrough for callers

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0.0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (or -1 for all)"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None, "is not supported yet"),
            ("stop", all(isinstance(s, str) and s for s in self.stop),
             "must be non-empty strings"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("watermark", self.watermark is None or self.watermark is False
             or isinstance(self.watermark, WatermarkConfig),
             "must be a WatermarkConfig, False (no watermark) or None (the engine's)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
