"""Fake of tensorrt_llm/llmapi/llm_args.py: ``KvCacheConfig`` and the LLM argument names.

Real ``KvCacheConfig(StrictBaseModel, PybindMirror)`` is a pydantic model that forbids unknown
fields; the fields we use, with their real defaults:
``enable_block_reuse: bool = True``, ``max_tokens: Optional[int] = None``,
``max_attention_window: Optional[List[int]] = None`` ("if the number of elements is less than
the number of layers, it will be repeated"), ``sink_token_length: Optional[int] = None``,
``free_gpu_memory_fraction: Optional[float] = None`` (TensorRT-LLM's default 0.9).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tensorrt_llm import _fake


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = None
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True

    def __post_init__(self):
        # pydantic's type check, for the one list field
        window = self.max_attention_window
        if window is not None and not (isinstance(window, list)
                                       and all(isinstance(w, int) for w in window)):
            raise ValueError(f"max_attention_window must be a list of int, got {window!r}")
        _fake.record("KvCacheConfig", asdict(self))


# BaseLlmArgs / TrtLlmArgs field names (real: BaseLLM.__init__ raises
# ValueError(f"{cls} got invalid argument: {key}") for any other keyword)
LLM_ARGS = frozenset({
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "tensor_parallel_size", "dtype", "revision", "tokenizer_revision", "pipeline_parallel_size",
    "context_parallel_size", "gpus_per_node", "kv_cache_config", "enable_chunked_prefill",
    "guided_decoding_backend", "max_batch_size", "max_input_len", "max_seq_len",
    "max_beam_width", "max_num_tokens", "gather_generation_logits", "iter_stats_max_iterations",
    "request_stats_max_iterations", "scheduler_config", "build_config", "workspace",
    "enable_build_cache", "backend", "return_perf_metrics",
})
