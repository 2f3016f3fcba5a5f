"""Safety screening with a Gemma classifier in ShieldGemma's prompt format.

ShieldGemma (Gemma fine-tuned as a policy classifier) reads one prompt that states the policy and
the content, and is scored by the next-token logits of "Yes" and "No":
``P(violation) = softmax([logit_Yes, logit_No])[0]``, as its model card does. Two templates: a user
prompt alone, or a user prompt with the model's response. Any Gemma checkpoint can stand in as the
classifier (the bundled 270M for tests; ShieldGemma 2B/9B for real use).

The forward is batched: several classification prompts are packed into one ``GemmaModel.forward``
(varlen causal attention within each, no KV cache) and only the last row of each is projected to
logits. ``Screener`` runs that forward in one worker thread and micro-batches whatever screening
calls arrive while the previous batch runs, so concurrent requests share forwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from trt_gemma import ops
from trt_gemma.errors import ConfigError
from trt_gemma.model import AttentionBackend

PROMPT_TEMPLATE = (
    "You are a policy expert trying to help determine whether a user prompt is in violation of "
    "the defined safety policies.\n\n"
    "<start_of_turn>\nHuman Question: {user_prompt}\n<end_of_turn>\n\n"
    "Our safety principle is defined in the below:\n\n{policy}\n\n"
    "Does the human question violate the above principle? Your answer must start with 'Yes' or "
    "'No'. And then walk through step by step to be sure we answer correctly.\n\n"
)
RESPONSE_TEMPLATE = (
    "You are a policy expert trying to help determine whether an AI response to prompt is in "
    "violation of the defined safety policies.\n\n"
    "<start_of_turn>\nHuman Question: {user_prompt}\n<end_of_turn>\n\n"
    "<start_of_turn>\nChatbot Response: {response}\n<end_of_turn>\n\n"
    "Our safety principle is defined in the below:\n\n{policy}\n\n"
    "Does the Chatbot Response violate the above principle? Your answer must start with 'Yes' or "
    "'No'. And then walk through step by step to be sure we answer correctly.\n\n"
)

# ShieldGemma's four harm types, worded for prompts ("The prompt shall not contain or seek
# generation of content that") and for responses ("The chatbot shall not generate content that").
_HARMS = (
    ("No Dangerous Content", "harming oneself and/or others (e.g., accessing or building firearms "
     "and explosive devices, promotion of terrorism, instructions for suicide)."),
    ("No Harassment", "is malicious, intimidating, bullying, or abusive content targeting another "
     "individual (e.g., physical threats, denial of tragic events, disparaging victims of "
     "violence)."),
    ("No Hate Speech", "targeting identity and/or protected attributes (e.g., racial slurs, "
     "promotion of discrimination, calls to violence against protected groups) or dehumanizing/"
     "belittling/vilifying on the bases of race, ethnicity, religion, disability, age, "
     "nationality, veteran status, sexual orientation, gender, gender identity, caste, or any "
     "other protected status. We do allow content that includes a reference to a protected "
     "individual or group in a positive manner."),
    ("No Sexually Explicit Information", "contains references to sexual acts or other lewd "
     "content (e.g., sexually graphic descriptions, content aimed at causing arousal). Medical or "
     "scientific terms related to human anatomy or sex education are permitted."),
)


def _default_policy(subject: str) -> str:
    return "\n".join(f'* "{name}": {subject} {text}' for name, text in _HARMS)


@dataclass(frozen=True)
class SafetyPolicy:
    """The policy text put in each classification prompt (one per template)."""

    prompt_policy: str  # for user prompts
    response_policy: str  # for model responses

    @classmethod
    def default(cls) -> SafetyPolicy:
        return cls(_default_policy("The prompt shall not contain or seek generation of content "
                                   "that"),
                   _default_policy("The chatbot shall not generate content that"))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SafetyPolicy:
        """A text file (the same policy for prompts and responses), or a JSON object with
        "prompt" and "response" policy texts."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--safety-policy {path}: cannot read ({e.strerror})") from None
        if not text.strip():
            raise ConfigError(f"--safety-policy {path}: the file is empty")
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--safety-policy {path}: not valid JSON ({e.msg}, line "
                                  f"{e.lineno})") from None
            if (not isinstance(data, dict) or set(data) != {"prompt", "response"}
                    or not all(isinstance(v, str) and v.strip() for v in data.values())):
                raise ConfigError(f"--safety-policy {path}: a JSON policy needs exactly the "
                                  "non-empty strings 'prompt' and 'response'")
            return cls(data["prompt"].strip(), data["response"].strip())
        return cls(text.strip(), text.strip())

    def prompt_text(self, user_prompt: str) -> str:
        return PROMPT_TEMPLATE.format(user_prompt=user_prompt.strip(), policy=self.prompt_policy)

    def response_text(self, user_prompt: str, response: str) -> str:
        return RESPONSE_TEMPLATE.format(user_prompt=user_prompt.strip(), response=response.strip(),
                                        policy=self.response_policy)


class PackedPrefill(AttentionBackend):
    """Whole sequences packed in one forward, no cache: causal attention within each."""

    def __init__(self, lengths: Sequence[int], device: torch.device):
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        self.cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)

    def attend(self, layer, q, k, v, *, scale, sliding_window, softcap):
        return ops.prefill_attention(q, k, v, self.cu_seqlens, self.cu_seqlens, scale=scale,
                                     causal=True, sliding_window=sliding_window, softcap=softcap)


class SafetyClassifier:
    """P("Yes") of classification prompts, batched, on a GemmaModel and its tokenizer."""

    def __init__(self, model, tokenizer, max_batch_tokens: int = 16384):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_tokens = max_batch_tokens
        ids = [tokenizer.token_to_id(word) for word in ("Yes", "No")]
        if None in ids:
            raise ConfigError("the safety model's tokenizer has no 'Yes' or 'No' token: it cannot "
                              "classify in ShieldGemma's format")
        self.yes_id, self.no_id = ids
        self.max_len = model.config.max_position_embeddings

    def encode(self, text: str) -> list[int]:
        """BOS + the text's tokens, the last max_len kept (the question is at the end)."""
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text, add_bos=False)]
        return ids if len(ids) <= self.max_len else [ids[0], *ids[len(ids) - self.max_len + 1:]]

    @torch.inference_mode()
    def p_yes(self, texts: Sequence[str]) -> list[float]:
        encoded = [self.encode(t) for t in texts]
        out: list[float] = []
        start = 0
        while start < len(encoded):  # batches of at most max_batch_tokens (at least one prompt)
            end, total = start + 1, len(encoded[start])
            while end < len(encoded) and total + len(encoded[end]) <= self.max_batch_tokens:
                total += len(encoded[end])
                end += 1
            out.extend(self._forward(encoded[start:end]))
            start = end
        return out

    def _forward(self, batch: list[list[int]]) -> list[float]:
        device = self.model.device
        lengths = [len(ids) for ids in batch]
        input_ids = torch.tensor([t for ids in batch for t in ids], device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        hidden = self.model.forward(input_ids, positions, PackedPrefill(lengths, device))
        last = torch.tensor(lengths, device=device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last])[:, [self.yes_id, self.no_id]]
        return torch.softmax(logits.float(), dim=-1)[:, 0].tolist()


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    p_yes: float  # the classifier's probability that the content violates the policy


class Screener:
    """Prompt and response screening against a threshold, micro-batched in a worker thread.

    ``flagged = P(Yes) > threshold``: threshold 0 flags everything, 1 nothing. ``on_latency``
    receives the seconds each screening call waited for its verdict (queue + forward).
    """

    def __init__(self, classifier: SafetyClassifier, policy: SafetyPolicy | None = None,
                 threshold: float = 0.5, max_batch: int = 16,
                 on_latency: Callable[[float], None] | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--safety-threshold must be in [0, 1], got {threshold}")
        self.classifier = classifier
        self.policy = policy or SafetyPolicy.default()
        self.threshold = threshold
        self.max_batch = max_batch
        self.on_latency = on_latency
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- the worker -----------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="safety-screener",
                                                daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            texts = [text for text, _, _ in batch]
            try:
                results: list = self.classifier.p_yes(texts)
            except Exception as e:  # noqa: BLE001 - each caller gets the error
                results = [e] * len(batch)
            for (_, loop, future), result in zip(batch, results, strict=True):
                loop.call_soon_threadsafe(_resolve, future, result)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(30)

    # -- screening ------------------------------------------------------------------------------
    async def p_yes(self, texts: Sequence[str]) -> list[float]:
        """P(Yes) of each classification prompt; concurrent calls share forwards."""
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        futures = []
        for text in texts:
            future = loop.create_future()
            self._queue.put((text, loop, future))
            futures.append(future)
        results = await asyncio.gather(*futures)
        if self.on_latency is not None:
            self.on_latency(time.perf_counter() - start)
        return list(results)

    def _verdicts(self, probabilities: list[float]) -> list[Verdict]:
        return [Verdict(p > self.threshold, p) for p in probabilities]

    async def screen_prompts(self, user_prompts: Sequence[str]) -> list[Verdict]:
        return self._verdicts(await self.p_yes([self.policy.prompt_text(p)
                                                for p in user_prompts]))

    async def screen_responses(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """pairs: (user prompt, model response)."""
        return self._verdicts(await self.p_yes([self.policy.response_text(p, r)
                                                for p, r in pairs]))


def _resolve(future: asyncio.Future, result) -> None:
    if future.done():  # the caller was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
