"""EngineConfig: the knobs of the serving runtime (batching, KV-cache size, fast paths).

Validated once, when the engine is built; every error names the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from trt_gemma.errors import ConfigError
from trt_gemma.responsible.synthid import WatermarkConfig

GiB = 1 << 30


LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")  # vLLM's names (raw: its default)
SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 256  # sequences in one step at most (decodes + prefills)
    max_num_batched_tokens: int = 2048  # new tokens in one step at most (the token budget)
    max_model_len: int | None = None  # prompt + output tokens; None: the model's context
    gpu_memory_utilization: float = 0.9  # CUDA: share of the GPU the process may fill (KV = rest)
    kv_cache_memory: int | None = None  # bytes of KV cache; None: 1.5 GiB on CPU, derived on CUDA
    num_kv_blocks: int | None = None  # override: blocks of the full-attention pool (tests)
    enable_prefix_caching: bool = True  # reuse KV blocks of identical prompt prefixes
    # "auto": FP8 (e4m3, per-layer scales) on CUDA when the engine was built with
    # --kv-cache-dtype fp8, else the model's dtype (fp32 on CPU); "fp8": always FP8 (needs those
    # scales; on CPU it runs the reference attention: for checking, not speed); "model": never FP8.
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False  # CUDA: never capture decode steps in CUDA graphs
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    seed: int = 0  # the engine's generator, for random sampling of requests without a seed
    # CPU: steps whose rows are all plain greedy, up to this many, take exact argmaxes through an
    # int8 pre-pass of the LM head (runtime/greedy_head.py); 0 = never; None = as many as it beats
    # the full head (GreedyHead.worthwhile_rows: 32 in bf16 where its one-level path runs, else
    # 10; 64 in fp32), for vocabularies of >= 32768 tokens
    greedy_head_max_rows: int | None = None
    # CPU: steps of fewer tokens than this run on one intra-op thread or on all of them, whichever
    # their own timings show faster (runtime/cpu_threads.py): one wins on a shared machine, where
    # every small op of a multi-thread forward waits for a descheduled thread, all of them on an
    # idle one. Larger steps always use every thread. 0 = never measure, always every thread.
    cpu_single_thread_below: int = 16
    # CPU, bf16/fp16 models: steps of at most this many tokens run the decoder's linear layers on
    # INT8 copies of their weights (W8A16, runtime/int8_decode.py): half the bytes a decode step
    # reads, for +0.2% perplexity on Gemma 3 270M. 0 = never (the model's own numerics).
    cpu_int8_decode_max_rows: int = 0
    # What logprobs report (vLLM's names and default): "raw_logprobs", the model's own
    # distribution (log_softmax of its logits, before penalties, temperature and any grammar
    # mask); "processed_logprobs", after the grammar mask, penalties and temperature (before
    # top-k / top-p / min-p), the distribution greedy and random rows actually draw from.
    logprobs_mode: str = "raw_logprobs"
    # Speculative decoding (runtime/speculative/): None = off; "ngram": prompt lookup, drafts
    # copied from the request's own prompt and output; "draft": a second, smaller model with the
    # same vocabulary proposes. Either way the target verifies all drafts of a sequence in one
    # forward, packed with the step's other decodes and prefill chunks; outputs are exactly the
    # target's (greedy: the same tokens; sampled: rejection sampling keeps its distribution).
    speculative_method: str | None = None
    num_speculative_tokens: int = 4  # K: drafts per sequence and step, at most
    draft_model: str | None = None  # "draft": a Gemma source or engine dir, same vocabulary
    ngram_min: int = 2  # "ngram": shortest suffix n-gram looked up in prompt + output
    ngram_max: int = 5  # "ngram": longest (the longest match wins)
    # K adapts per sequence: after a verification that rejected a draft, the next proposal has
    # one token more than were accepted; after all were accepted, K again (False: always K).
    speculative_adaptive: bool = True
    # No drafts in a step where more sequences than this decode: a big batch already fills the
    # GEMMs (CPU: verifying K more rows each costs more than the accepted tokens save). 0: never.
    speculative_disable_by_batch_size: int = 4
    # SynthID-Text watermark of every request (serve --watermark-config); a request opts out with
    # SamplingParams.watermark=False or brings its own config. None: only requests that ask.
    watermark: WatermarkConfig | None = None
    # Tensor parallelism: ranks the model is split over, one process each (this one is rank 0;
    # LLMEngine.from_source starts the others). gloo on CPU, NCCL on CUDA (rank r on cuda:r).
    # kv_cache_memory is then per rank: each holds its KV heads' share of every block.
    tensor_parallel_size: int = 1
    # A collective that waits longer than this means a rank died or hangs: the engine stops with
    # RankFailure. Must exceed the longest step (a full-budget prefill on CPU takes seconds).
    tensor_parallel_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        checks = [
            ("block_size", self.block_size >= 1, "must be >= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= self.max_num_seqs,
             f"must be >= max_num_seqs ({self.max_num_seqs}) so every decode fits a step"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2,
             "must be >= 2 or None"),
            ("gpu_memory_utilization", 0.0 < self.gpu_memory_utilization <= 1.0,
             "must be in (0, 1]"),
            ("kv_cache_memory", self.kv_cache_memory is None or self.kv_cache_memory > 0,
             "must be > 0 bytes or None"),
            ("num_kv_blocks", self.num_kv_blocks is None or self.num_kv_blocks >= 1,
             "must be >= 1 or None"),
            ("cuda_graph_batch_sizes", all(b >= 1 for b in self.cuda_graph_batch_sizes),
             "must be positive batch sizes"),
            ("cpu_single_thread_below", self.cpu_single_thread_below >= 0, "must be >= 0"),
            ("kv_cache_dtype", self.kv_cache_dtype in ("auto", "fp8", "model"),
             "must be 'auto', 'fp8' or 'model'"),
            ("cpu_int8_decode_max_rows", self.cpu_int8_decode_max_rows >= 0, "must be >= 0"),
            ("logprobs_mode", self.logprobs_mode in LOGPROBS_MODES,
             "must be 'raw_logprobs' or 'processed_logprobs'"),
            ("speculative_method",
             self.speculative_method is None or self.speculative_method in SPECULATIVE_METHODS,
             "must be None, 'ngram' or 'draft'"),
            ("num_speculative_tokens", 1 <= self.num_speculative_tokens <= 32,
             "must be in [1, 32]"),
            ("draft_model", self.draft_model is None or self.speculative_method == "draft",
             "is read only with speculative_method 'draft'"),
            ("ngram_min", self.ngram_min >= 1, "must be >= 1"),
            ("ngram_max", self.ngram_max >= self.ngram_min,
             f"must be >= ngram_min ({self.ngram_min})"),
            ("speculative_disable_by_batch_size", self.speculative_disable_by_batch_size >= 0,
             "must be >= 0"),
            ("greedy_head_max_rows",
             self.greedy_head_max_rows is None or self.greedy_head_max_rows >= 0,
             "must be >= 0 or None"),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"),
            ("tensor_parallel_timeout_s", self.tensor_parallel_timeout_s > 0, "must be > 0"),
            ("watermark", self.watermark is None or isinstance(self.watermark, WatermarkConfig),
             "must be a WatermarkConfig or None"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"EngineConfig.{name} {why}, got {getattr(self, name)!r}")
        object.__setattr__(self, "cuda_graph_batch_sizes",
                           tuple(sorted(set(self.cuda_graph_batch_sizes))))
