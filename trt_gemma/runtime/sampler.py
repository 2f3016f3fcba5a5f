"""Sampler: the next token of every sequence of a step, in one pass over the batch's logits.

Order of processing (vLLM's): the grammar's token bitmask on constrained rows (guided decoding)
→ stop tokens masked until ``min_tokens`` → repetition, presence and frequency penalties →
greedy rows take the argmax; random rows are divided by their temperature, filtered by top-k,
top-p, min-p, and sampled. Logprobs (``logprobs_mode``) are by default those of the raw model
distribution, read before any of this; "processed_logprobs" reads them after the mask,
penalties and temperature, before the filters (see ``outputs.Logprob``).

A grammar wins over ``min_tokens`` and ``ignore_eos``: where it allows nothing but a stop token,
the stop token stays, and a grammar that has ended ends its sequence (the engine's check).

Sampling draws ``argmax(p / e)`` with ``e ~ Exp(1)`` per token (the exponential race, equivalent to
drawing from p). A seeded sequence draws its noise from its own ``torch.Generator``, one ``[vocab]``
draw per step, so its tokens do not depend on which other sequences share the batch.

SynthID-Text watermark (trt_gemma/responsible/synthid.py): a watermarked row's scores go through
``Watermarker.apply`` last, where transformers appends its processor (after penalties,
temperature, top-k, top-p and min-p): random rows draw from the softmax of the watermarked scores,
greedy rows take their argmax (greedy has no temperature or filters, as in transformers). Logprobs
are read before the watermark, as the model (or the processed, unwatermarked distribution) gives
them: a client never sees g-values through logprobs.

Fast path: an all-greedy batch without penalties, logprobs, grammars, watermarks or pending
``min_tokens`` is one argmax.

``process`` gives each row's processed distribution without drawing from it (``__call__`` is
process, then draw, then logprobs): speculative verification and draft models read the same rows
(runtime/speculative/verify.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trt_gemma.guided.matcher import mask_logits
from trt_gemma.responsible.synthid import WatermarkConfig, Watermarker
from trt_gemma.runtime.config import LOGPROBS_MODES
from trt_gemma.runtime.sequence import Sequence


# (sampled token's logprob, its rank (1 = most likely), top-N [(token id, logprob)])
TokenLogprobs = tuple[float, int, list[tuple[int, float]]]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # per row
    logprobs: list[TokenLogprobs | None]  # per row; None where the request asked for none


@dataclass
class ProcessedRows:
    """``Sampler.process``'s answer: what each row of a step draws from."""

    argmax: torch.Tensor  # [S] argmax of the processed logits: greedy rows' tokens
    random_rows: list[int]  # rows that draw at random (temperature > 0)
    probs: torch.Tensor | None  # [len(random_rows), vocab] the distribution each draws from
    want: list[int]  # rows that report logprobs
    logprob_logits: torch.Tensor  # raw: [len(want), vocab]; processed: [S, vocab]
    raw: bool  # logprob_logits holds the want rows only (raw_logprobs)

    def logprobs(self, tokens: list[int], seqs: list) -> list[TokenLogprobs | None]:
        """The logprobs entry of each row's token (None where none was asked for)."""
        out: list[TokenLogprobs | None] = [None] * len(tokens)
        for j, i in enumerate(self.want):
            row = self.logprob_logits[j if self.raw else i]
            out[i] = _token_logprobs(row, tokens[i], seqs[i].params.logprobs)
        return out


def _has_penalty(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int], device: torch.device, seed: int = 0,
                 logprobs_mode: str = "raw_logprobs"):
        assert logprobs_mode in LOGPROBS_MODES, logprobs_mode  # EngineConfig checked it
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = torch.device(device)
        self.logprobs_mode = logprobs_mode
        # Noise of unseeded random rows: one engine-wide generator (reproducible per engine run).
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # One Watermarker per distinct config (its table and candidate terms are built once).
        self._watermarkers: dict[WatermarkConfig, Watermarker] = {}

    def stop_token_ids(self, seq: Sequence) -> set[int]:
        ids = set(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    @staticmethod
    def is_plain_greedy(seq: Sequence) -> bool:
        """Greedy with nothing that reads or changes the logits: argmax is all it needs."""
        p = seq.params
        return (p.temperature == 0.0 and p.logprobs is None and not _has_penalty(seq)
                and seq.num_output_tokens >= p.min_tokens and seq.grammar is None
                and _watermark_of(seq) is None)

    def watermarker(self, config: WatermarkConfig) -> Watermarker:
        marker = self._watermarkers.get(config)
        if marker is None:
            marker = self._watermarkers[config] = Watermarker(config, self.device)
        return marker

    def _watermark(self, x: torch.Tensor, seqs: list) -> torch.Tensor:
        """Rows of x [R, vocab] (a tensor of the caller's own, changed in place) whose sequence is
        watermarked, through its config's Watermarker (one batched apply per config)."""
        by_config: dict[WatermarkConfig, list[int]] = {}
        for j, seq in enumerate(seqs):
            state = _watermark_of(seq)
            if state is not None:
                by_config.setdefault(state.config, []).append(j)
        for config, rows in by_config.items():
            states = [_watermark_of(seqs[j]) for j in rows]
            if len(rows) == x.shape[0]:
                x = self.watermarker(config).apply(x, states)
            else:
                idx = torch.tensor(rows, device=x.device)
                x[idx] = self.watermarker(config).apply(x[idx], states)
        return x

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,  # [S, vocab] float32, modified in place
        seqs: list[Sequence],  # the sequence each row samples for
    ) -> SamplerOutput:
        if all(self.is_plain_greedy(s) for s in seqs):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(seqs))
        rows = self.process(logits, seqs)
        tokens = rows.argmax
        if rows.random_rows:
            idx = torch.tensor(rows.random_rows, device=logits.device)
            tokens[idx] = self.draw(rows.probs, [seqs[i] for i in rows.random_rows])
        token_list = tokens.tolist()
        return SamplerOutput(token_list, rows.logprobs(token_list, seqs))

    def process(self, logits: torch.Tensor, seqs: list) -> ProcessedRows:
        """Each row's distribution, as it is drawn from: logits [S, vocab] (modified in place)
        after the grammar mask, min_tokens and penalties; greedy rows take their argmax, random
        rows draw from ``probs`` (temperature, top-k, top-p, min-p applied). Speculative
        verification reads the same rows (``seqs`` may be ``speculative.RowView`` s)."""
        rows = range(len(seqs))
        want = [i for i in rows if seqs[i].params.logprobs is not None]
        raw = None  # [len(want), vocab]: the model's own logits, before anything below
        if want and self.logprobs_mode == "raw_logprobs":
            raw = logits[torch.tensor(want, device=logits.device)].clone()
        guided = [i for i in rows if seqs[i].grammar is not None]
        if guided:
            mask_logits(logits, guided, [seqs[i].grammar for i in guided])
        for i in rows:
            seq = seqs[i]
            if seq.num_output_tokens < seq.params.min_tokens:
                self._hold_stop_tokens(logits[i], seq)
            if _has_penalty(seq):
                _apply_penalties(logits[i], seq)
        argmax = logits.argmax(dim=-1)
        marked_greedy = [i for i in rows if seqs[i].params.temperature == 0.0
                         and _watermark_of(seqs[i]) is not None]
        if marked_greedy:  # on a copy: logits stay unwatermarked for the logprobs
            idx = torch.tensor(marked_greedy, device=logits.device)
            marked = self._watermark(logits[idx], [seqs[i] for i in marked_greedy])
            argmax[idx] = marked.argmax(dim=-1)
        processed = logits  # what logprobs are read from: greedy rows keep their logits
        random_rows = [i for i in rows if seqs[i].params.temperature != 0.0]
        probs = None
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            temps = torch.tensor([seqs[i].params.temperature for i in random_rows],
                                 dtype=logits.dtype, device=logits.device)
            x = logits[idx] / temps[:, None]  # [R, vocab]
            if raw is None and any(seqs[i].params.logprobs is not None for i in random_rows):
                processed = logits.clone()
                processed[idx] = x
            x = self._filter(x, [seqs[i] for i in random_rows])
            x = self._watermark(x, [seqs[i] for i in random_rows])
            probs = torch.softmax(x, dim=-1)
        return ProcessedRows(argmax, random_rows, probs, want,
                             raw if raw is not None else processed, raw is not None)

    def _hold_stop_tokens(self, row: torch.Tensor, seq: Sequence) -> None:
        """min_tokens: forbid the stop tokens of row [vocab], in place; on a constrained row only
        where its grammar still allows another token (the grammar wins)."""
        stop = [t for t in self.stop_token_ids(seq) if t < row.shape[0]]
        if not stop:
            return
        kept = row[stop].clone() if seq.grammar is not None else None
        row[stop] = float("-inf")
        if kept is not None and not torch.isfinite(row).any():
            row[stop] = kept

    def _filter(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """top-k, then top-p, then min-p; filtered tokens get -inf. x: [R, vocab]."""
        vocab = x.shape[1]
        ks = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs]
        ps = [s.params.top_p for s in seqs]
        sort_rows = [j for j in range(len(seqs)) if ks[j] < vocab or ps[j] < 1.0]
        if sort_rows:
            idx = torch.tensor(sort_rows, device=x.device)
            sub = x[idx]
            sorted_x, order = sub.sort(dim=-1, descending=True)
            k = torch.tensor([ks[j] for j in sort_rows], device=x.device)
            drop = torch.arange(vocab, device=x.device)[None, :] >= k[:, None]
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            p = torch.tensor([ps[j] for j in sort_rows], dtype=x.dtype, device=x.device)
            probs = torch.softmax(sorted_x, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (probs.cumsum(dim=-1) - probs) > p[:, None]
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x[idx] = sorted_x.scatter(1, order, sorted_x)
        min_ps = [s.params.min_p for s in seqs]
        if any(min_ps):
            probs = torch.softmax(x, dim=-1)
            m = torch.tensor(min_ps, dtype=x.dtype, device=x.device)[:, None]
            x = x.masked_fill(probs < m * probs.amax(dim=-1, keepdim=True), float("-inf"))
        return x

    def draw(self, probs: torch.Tensor, seqs: list) -> torch.Tensor:
        """One token per row of probs [R, vocab] by the exponential race."""
        noise = torch.empty_like(probs)
        unseeded = [j for j, s in enumerate(seqs) if s.generator is None]
        for j, s in enumerate(seqs):
            if s.generator is not None:
                noise[j].exponential_(generator=s.generator)
        if unseeded:
            idx = torch.tensor(unseeded, device=probs.device)
            noise[idx] = torch.empty(len(unseeded), probs.shape[1], dtype=probs.dtype,
                                     device=probs.device).exponential_(generator=self.generator)
        return (probs / noise).argmax(dim=-1)


def _watermark_of(seq):
    """A row's WatermarkState, or None (speculative.RowView s are never watermarked)."""
    return getattr(seq, "watermark", None)


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """In place on one [vocab] row: CTRL repetition penalty over prompt and output tokens,
    OpenAI presence/frequency penalties over output tokens."""
    p = seq.params
    vocab = row.shape[0]
    out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=row.device)
    out = out[out < vocab]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(seq.token_ids, dtype=torch.long, device=row.device).unique()
        seen = seen[seen < vocab]
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and out.numel():
        counts = torch.bincount(out, minlength=vocab).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _token_logprobs(row: torch.Tensor, token: int, n: int) -> TokenLogprobs:
    lp = torch.log_softmax(row.float(), dim=-1)
    chosen = lp[token]
    rank = int((lp > chosen).sum()) + 1
    top: list[tuple[int, float]] = []
    if n:
        values, ids = lp.topk(n)
        # processed logprobs of a constrained row: fewer than n tokens may be allowed
        top = [(t, v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)
               if v != float("-inf")]
    return float(chosen), rank, top
