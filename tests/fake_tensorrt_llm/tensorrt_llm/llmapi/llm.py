"""Fake of tensorrt_llm/llmapi/llm.py: ``BaseLLM`` / ``_TrtLLM`` (and a ``_TorchLLM`` that
refuses to run, so a test notices if the PyTorch-backend class is picked for an engine).

Real signatures (1.0 / 1.1):

- ``_TrtLLM.__init__(self, model: Union[str, Path], tokenizer=None, tokenizer_mode='auto',
  skip_tokenizer_init: bool = False, trust_remote_code: bool = False,
  tensor_parallel_size: int = 1, dtype: str = "auto", revision=None, tokenizer_revision=None,
  **kwargs)``; ``BaseLLM.__init__`` raises ``ValueError("... got invalid argument: key")`` for a
  keyword that is no ``TrtLlmArgs`` field. A directory whose config.json has ``build_config``
  is loaded as a built engine.
- ``generate_async(self, inputs: PromptInputs, sampling_params: Optional[SamplingParams] = None,
  lora_request=None, prompt_adapter_request=None, streaming: bool = False,
  kv_cache_retention_config=None, disaggregated_params=None, _postproc_params=None,
  scheduling_params=None, cache_salt=None) -> RequestOutput``. ``_prepare_sampling_params``:
  ``end_id`` None needs the tokenizer (``ValueError`` when it was skipped). ``_check_arguments``
  (TensorRT backend, no chunked prefill): ``ValueError`` when prompt length + ``max_tokens``
  exceeds the engine's ``build_config.max_seq_len``, or ``best_of`` exceeds ``max_batch_size``.
  ``RuntimeError("LLM is shutting down")`` after ``shutdown``.
- ``shutdown(self) -> None``: stops the executor (idempotent).
- ``RequestOutput``: a ``GenerationResult`` (executor/result.py) with ``prompt``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tensorrt_llm import _fake
from tensorrt_llm.executor.result import GenerationResult
from tensorrt_llm.llmapi.llm_args import LLM_ARGS, KvCacheConfig
from tensorrt_llm.sampling_params import SamplingParams


class RequestOutput(GenerationResult):
    prompt = None


class _TrtLLM:
    def __init__(self, model, tokenizer=None, tokenizer_mode="auto", skip_tokenizer_init=False,
                 trust_remote_code=False, tensor_parallel_size=1, dtype="auto", revision=None,
                 tokenizer_revision=None, **kwargs):
        arguments = dict(model=model, tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init,
                         tensor_parallel_size=tensor_parallel_size, dtype=dtype, **kwargs)
        _fake.record("LLM.__init__", arguments)
        for key in kwargs:
            if key not in LLM_ARGS:
                raise ValueError(f"{type(self).__name__} got invalid argument: {key}")
        kv = kwargs.get("kv_cache_config")
        if kv is not None and not isinstance(kv, KvCacheConfig):
            raise TypeError("kv_cache_config must be a KvCacheConfig")
        engine_dir = Path(model)
        config = json.loads((engine_dir / "config.json").read_text())
        if "build_config" not in config or not (engine_dir / "rank0.engine").is_file():
            raise ValueError(f"{model}: the fake loads built engines only")
        self._build_config = config["build_config"]
        self.tokenizer = None if skip_tokenizer_init else object()
        self._ids = itertools.count()
        self._requests: dict[int, GenerationResult] = {}
        self._executor = _fake.Executor()
        self._executor.abort_request = self._abort_request

    def generate_async(self, inputs, sampling_params: SamplingParams | None = None,
                       lora_request=None, prompt_adapter_request=None, streaming: bool = False,
                       kv_cache_retention_config=None, disaggregated_params=None,
                       _postproc_params=None, scheduling_params=None, cache_salt=None):
        _fake.record("LLM.generate_async", {"inputs": inputs, "sampling_params": sampling_params,
                                            "streaming": streaming})
        if self._executor is None or self._executor.is_shutdown():
            raise RuntimeError("LLM is shutting down")
        sp = sampling_params or SamplingParams()
        if sp.end_id is None and self.tokenizer is None:
            raise ValueError("tokenizer is required to reset end_id if it is None, or you can "
                             "explicitly specify the end_id for sampling_params")
        if not isinstance(inputs, list) or not all(isinstance(t, int) for t in inputs):
            raise TypeError("the fake takes token ids (a text prompt needs the tokenizer)")
        max_seq_len = self._build_config["max_seq_len"]
        if len(inputs) + (sp.max_tokens or 0) > max_seq_len:
            raise ValueError(f"The sum of prompt length ({len(inputs)}) and query length (0) "
                             f"max_tokens ({sp.max_tokens}) should not exceed max_seq_len "
                             f"({max_seq_len})")
        if sp.best_of > self._build_config["max_batch_size"]:
            raise ValueError("sampling_params.n cannot exceed max_batch_size")
        request_id = next(self._ids)
        result = RequestOutput(request_id, inputs, sp, streaming, self._executor, max_seq_len)
        self._requests[request_id] = result
        self._executor.submit(result)
        return result

    def _abort_request(self, request_id: int) -> None:
        result = self._requests.get(request_id)
        if result is not None:
            result._cancel = True

    def shutdown(self) -> None:
        _fake.record("LLM.shutdown", {})
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


class _TorchLLM:
    """Real: the PyTorch-backend LLM (``tensorrt_llm.LLM`` since 1.0); it loads HF checkpoints,
    not TensorRT engines."""

    def __init__(self, *args, **kwargs):
        _fake.record("TorchLLM.__init__", kwargs)
        raise RuntimeError("fake: tensorrt_llm.LLM is the PyTorch backend; TensorRT engines "
                           "load with tensorrt_llm._tensorrt_engine.LLM")
