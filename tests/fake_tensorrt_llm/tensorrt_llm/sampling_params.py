"""Fake of tensorrt_llm/sampling_params.py: ``SamplingParams``.

Real: ``@dataclass(slots=True, kw_only=True) class SamplingParams`` with (among others)
``end_id: Optional[int] = None``, ``pad_id: Optional[int] = None``, ``max_tokens: int = 32``,
``stop: Optional[Union[str, List[str]]] = None``, ``stop_token_ids: Optional[List[int]] = None``,
``include_stop_str_in_output: bool = False``, ``n: int = 1``, ``best_of: Optional[int] = None``,
``use_beam_search: bool = False``, ``top_k``, ``top_p``, ``seed``, ``temperature``,
``min_tokens``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``min_p``
(all Optional, None = the C++ runtime's default), ``logprobs: Optional[int] = None``,
``ignore_eos: bool = False``, ``detokenize: bool = True``, ``skip_special_tokens: bool = True``.
``__post_init__``: ``pad_id`` defaults to ``end_id``; ``best_of = best_of or n``; ``_validate``
refuses ``best_of > 1`` under greedy decoding (``top_k in (None, 1)`` and ``top_p in (None,
0.0)``) unless TLLM_ALLOW_N_GREEDY_DECODING is set. Unknown keywords raise TypeError (a
kw-only dataclass).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self):
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        greedy = (not self.use_beam_search and self.top_k in (None, 1)
                  and self.top_p in (None, 0.0))
        if self.best_of > 1 and greedy:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")

    def as_dict(self) -> dict:
        return asdict(self)
