"""SynthID-Text watermarking (tournament sampling, Dathathri et al., Nature 2024), batched.

Compatible with transformers' ``SynthIDTextWatermarkLogitsProcessor``: the same ``keys``,
``ngram_len``, ``sampling_table_size``, ``sampling_table_seed`` and ``context_history_size`` give
the same g-values and the same watermarked scores, so either side detects the other's text.

The math, as the reference does it:
- hash(seq) folds tokens into a signed int64 with an LCG step ``h = (h + t) * M + 1`` (wrapping),
  starting from 1; the g-value of candidate ``v`` after context ``c`` at depth ``d`` is
  ``table[hash(c + [v] + [key_d]) mod table_size]`` where ``table`` is ``torch.randint(0, 2,
  (table_size,))`` from a CPU generator seeded with ``sampling_table_seed``.
- the scores become ``log(p_D)`` with ``p_0 = softmax(scores)`` and, per depth,
  ``p_{d+1} = p_d * (1 + g_d - sum(g_d * p_d))`` (a tournament of 2 contestants per layer);
  ``log 0`` is written as float32's most negative finite value.
- a context whose hash is among the last ``context_history_size`` contexts' hashes is left
  unwatermarked (its scores pass unchanged); the history starts full of zeros.

Since ``hash`` is affine in the candidate token, ``hash(c + [v] + [key_d]) = base_d(c) + v * M^2``
(mod 2^64): one multiply per vocabulary entry shared by all rows and depths, then one add, one
mod and one gather per (row, entry, depth). Entries whose incoming score is -inf (filtered by
top-k/top-p/min-p or a grammar) have probability 0 before and after, so where most of a row is
filtered only its finite entries are hashed (a ragged pass over the batch).

The sampling table comes from a CPU generator always; transformers builds it on the model's device,
so a transformers processor matches ours with ``device="cpu"`` (a CUDA generator draws another
table).
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from trt_gemma.errors import ConfigError

LCG_MULTIPLIER = 6364136223846793005  # newlib/musl LCG, as transformers' accumulate_hash
_MASK64 = (1 << 64) - 1


def _int64(x: int) -> int:
    """x mod 2^64 read as a signed int64 (torch's wrapping arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def accumulate_hash(h: int, tokens) -> int:
    """The reference's hash step over tokens, on Python ints (exact int64 wrapping)."""
    for t in tokens:
        h = _int64((h + int(t)) * LCG_MULTIPLIER + 1)
    return h


_M2 = _int64(LCG_MULTIPLIER * LCG_MULTIPLIER)


@dataclass(frozen=True)
class WatermarkConfig:
    """SynthID-Text settings, the fields of transformers' SynthIDTextWatermarkingConfig.

    The keys are the secret: they never appear in repr/str or in error messages.
    """

    # One key per tournament layer (depth = len(keys)); secret.
    keys: tuple[int, ...] = field(repr=False)
    # Tokens per n-gram: the context is the last ngram_len - 1 tokens.
    ngram_len: int
    # Entries of the random 0/1 table g-values are read from (transformers: at most 2**24).
    sampling_table_size: int = 2**16
    # Seed of the CPU generator that draws the table.
    sampling_table_seed: int = 0
    # How many past context hashes a sequence remembers for the repeated-context rule.
    context_history_size: int = 1024
    # Leave the first ngram_len - 1 tokens of each sequence unwatermarked (transformers' option).
    skip_first_ngram_calls: bool = False

    def __post_init__(self):
        if not self.keys or not all(isinstance(k, int) and not isinstance(k, bool)
                                    for k in self.keys):
            raise ConfigError("watermark config: keys must be a non-empty list of integers")
        if not all(-(1 << 63) <= k < 1 << 63 for k in self.keys):
            raise ConfigError("watermark config: keys must fit in int64")
        for name, low, high in (("ngram_len", 1, 1 << 16), ("sampling_table_size", 2, 2**24),
                                ("context_history_size", 1, 1 << 24)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"watermark config: {name} must be an integer in "
                                  f"[{low}, {high}], got {value!r}")
        if not isinstance(self.sampling_table_seed, int):
            raise ConfigError("watermark config: sampling_table_seed must be an integer")

    def __str__(self) -> str:
        return repr(self)

    @property
    def depth(self) -> int:
        return len(self.keys)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "watermark config") -> WatermarkConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        known = {"keys", "ngram_len", "sampling_table_size", "sampling_table_seed",
                 "context_history_size", "skip_first_ngram_calls"}
        # debug_mode is transformers' test switch (uniform scores): accepted only when off.
        unknown = set(data) - known - {"debug_mode"}
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {sorted(unknown)}")
        if data.get("debug_mode"):
            raise ConfigError(f"{source}: debug_mode is not supported")
        for name in ("keys", "ngram_len"):
            if name not in data:
                raise ConfigError(f"{source}: missing field {name!r}")
        if not isinstance(data["keys"], list):
            raise ConfigError(f"{source}: keys must be a list of integers")
        fields = {k: v for k, v in data.items() if k in known}
        fields["keys"] = tuple(data["keys"])
        return cls(**fields)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> WatermarkConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ConfigError(f"watermark config {path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            # The message names the position only, never the text (it may hold keys).
            raise ConfigError(f"watermark config {path}: not valid JSON (line {e.lineno})") \
                from None
        return cls.from_dict(data, source=f"watermark config {path}")


class WatermarkState:
    """One sequence's watermarking state: its context and the hashes of its past contexts.

    Starts as transformers' processor starts: an all-zero context (the prompt does not seed it; the
    processor only ever shifts in tokens it sees generated) and a history full of zeros. ``advance``
    once per sampled token; ``fork`` for a speculative branch.
    """

    __slots__ = ("context", "context_hash", "num_calls", "_history", "_counts", "_config")

    def __init__(self, config: WatermarkConfig):
        self._config = config
        self.context = [0] * (config.ngram_len - 1)
        self.context_hash = accumulate_hash(1, self.context)
        self.num_calls = 0  # tokens sampled so far (the reference's num_calls - 1 at apply time)
        self._history: deque[int] = deque([0] * config.context_history_size)
        self._counts = Counter({0: config.context_history_size})

    @property
    def config(self) -> WatermarkConfig:
        """The configuration this state follows (the sampler groups rows by it)."""
        return self._config

    @property
    def is_skipped(self) -> bool:
        """skip_first_ngram_calls: this position passes unwatermarked and unrecorded."""
        return self._config.skip_first_ngram_calls and self.num_calls + 1 < self._config.ngram_len

    @property
    def is_repeated_context(self) -> bool:
        return self._counts[self.context_hash] > 0

    def advance(self, token_id: int) -> None:
        """After sampling token_id at this position: remember this context, shift the token in."""
        if not self.is_skipped:
            oldest = self._history.pop()
            self._counts[oldest] -= 1
            self._history.appendleft(self.context_hash)
            self._counts[self.context_hash] += 1
        if self.context:
            self.context = self.context[1:] + [int(token_id)]
            self.context_hash = accumulate_hash(1, self.context)
        self.num_calls += 1

    def along(self, token_ids) -> list[WatermarkState]:
        """States at each position of a speculative draft: [this one (a fork), after
        token_ids[0], after token_ids[:2], ...] (len(token_ids) + 1 states, this one unchanged).
        Verification applies the watermark to row k with state k; after acceptance the
        sequence's own state advances by the accepted tokens."""
        states = [self.fork()]
        for t in token_ids:
            nxt = states[-1].fork()
            nxt.advance(t)
            states.append(nxt)
        return states

    def fork(self) -> WatermarkState:
        other = WatermarkState.__new__(WatermarkState)
        other._config = self._config
        other.context = list(self.context)
        other.context_hash = self.context_hash
        other.num_calls = self.num_calls
        other._history = deque(self._history)
        other._counts = Counter(self._counts)
        return other


class Watermarker:
    """The batched SynthID-Text logits transform for one config on one device."""

    def __init__(self, config: WatermarkConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        generator = torch.Generator(device="cpu").manual_seed(config.sampling_table_seed)
        table = torch.randint(0, 2, (config.sampling_table_size,), generator=generator)
        self.sampling_table = table.to(self.device)  # int64 [table_size], as the reference's
        # uint8 copy for the hot gather: index_select on bytes is ~2x faster than on float32.
        self._table_u8 = self.sampling_table.to(torch.uint8)
        size = config.sampling_table_size
        self._mod_mask = size - 1 if size & (size - 1) == 0 else None  # & == mod for 2^k
        # base_d(c) = hash(c) * M^2 + M + 1 + key_d * M  (mod 2^64): the per-depth constant part.
        self._key_terms = [_int64(LCG_MULTIPLIER + 1 + k * LCG_MULTIPLIER) for k in config.keys]
        self._candidate_terms: dict[int, torch.Tensor] = {}  # vocab -> arange(vocab) * M^2
        # A 2^k table (k <= 31) reads only the low bits of a hash, which int32 wrapping
        # arithmetic gets right: half the bytes per entry on the dense path.
        self._narrow = self._mod_mask is not None and size <= 2**31
        # CPU: the dense path walks rows one by one so its [rows, vocab] temporaries stay in
        # cache (32 rows at once of a 262k vocabulary: 4x slower, measured); CUDA: all at once.
        self.dense_chunk_rows = 1 if self.device.type == "cpu" else 1 << 30

    def __repr__(self) -> str:
        return f"Watermarker({self.config!r}, device={self.device})"

    def new_state(self) -> WatermarkState:
        return WatermarkState(self.config)

    # ---- g-values ---------------------------------------------------------------------------

    def _bases(self, context_hashes: list[int]) -> torch.Tensor:
        """[R, depth] int64: base_d of each row's context."""
        rows = [[_int64(_int64(h * _M2) + kt) for kt in self._key_terms] for h in context_hashes]
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def _table_index(self, hashes: torch.Tensor) -> torch.Tensor:
        if self._mod_mask is not None:
            return hashes.bitwise_and_(self._mod_mask)
        return hashes.remainder_(self.config.sampling_table_size)

    def _lookup(self, index: torch.Tensor) -> torch.Tensor:
        """float32 g-values (0.0 / 1.0) at table positions index (any shape)."""
        flat = self._table_u8.index_select(0, index.reshape(-1))
        return flat.view(index.shape).to(torch.float32)

    def _candidates(self, vocab: int, narrow: bool = False) -> torch.Tensor:
        """[vocab] v * M^2 (mod 2^64) as int64, or its low 32 bits as int32 (narrow)."""
        key = (vocab, narrow)
        terms = self._candidate_terms.get(key)
        if terms is None:
            terms = torch.arange(vocab, dtype=torch.int64, device=self.device) * _M2
            if narrow:
                terms = terms.bitwise_and(0xFFFFFFFF).to(torch.int32)  # wraps to the low bits
            self._candidate_terms[key] = terms
        return terms

    def g_values_for_candidates(self, context_hashes: list[int], vocab: int) -> torch.Tensor:
        """[R, vocab, depth] int64: the g-value of every next token after each row's context."""
        bases = self._bases(context_hashes)
        cand = self._candidates(vocab)
        out = torch.empty(len(context_hashes), vocab, self.config.depth, dtype=torch.int64,
                          device=self.device)
        for d in range(self.config.depth):
            idx = self._table_index(cand[None, :] + bases[:, d, None])
            out[:, :, d] = self.sampling_table[idx]
        return out

    def g_values(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[B, L - ngram_len + 1, depth] int64: g-values of every n-gram of token_ids [B, L]
        (the reference's compute_g_values), vectorised over positions."""
        n = self.config.ngram_len
        ids = token_ids.to(device=self.device, dtype=torch.int64)
        num = ids.shape[1] - n + 1
        if num <= 0:
            return torch.zeros(ids.shape[0], 0, self.config.depth, dtype=torch.int64,
                               device=self.device)
        h = torch.ones(ids.shape[0], num, dtype=torch.int64, device=self.device)
        for i in range(n):  # loop over n-gram positions, not tokens
            h = (h + ids[:, i:i + num]) * LCG_MULTIPLIER + 1
        keys = torch.tensor(self.config.keys, dtype=torch.int64, device=self.device)
        h = (h[:, :, None] + keys) * LCG_MULTIPLIER + 1
        return self.sampling_table[self._table_index(h)]

    # ---- the logits transform -----------------------------------------------------------------

    def apply(self, logits: torch.Tensor, states: list[WatermarkState]) -> torch.Tensor:
        """Watermarked scores for logits [R, V] float32, row r sampled with states[r].

        Does what transformers' processor does to its scores (call it after temperature and the
        top-k/top-p/min-p filters, then sample from softmax of the result). Pure: the states are
        not changed; ``advance`` them with the sampled tokens.
        """
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"apply: logits {tuple(logits.shape)} vs {len(states)} states")
        rows = [r for r, s in enumerate(states) if not s.is_skipped and not s.is_repeated_context]
        if not rows:
            return logits
        out = logits.clone()
        idx = torch.tensor(rows, device=logits.device)
        sub = logits.index_select(0, idx).to(self.device)
        hashes = [states[r].context_hash for r in rows]
        finite = torch.isfinite(sub)
        if int(finite.sum()) * 2 < finite.numel():
            watermarked = self._tournament_sparse(sub, finite, hashes)
        else:
            watermarked = self._tournament_dense(sub, hashes)
        out[idx] = watermarked.to(out.device, out.dtype)
        return out

    def _tournament_dense(self, scores: torch.Tensor, hashes: list[int]) -> torch.Tensor:
        """Every entry hashed; the same float ops in the same order as the reference (rows are
        independent, so walking them in chunks changes no bit)."""
        bases = self._bases(hashes)
        if self._narrow:
            bases = _low32(bases)
        cand = self._candidates(scores.shape[1], narrow=self._narrow)
        out = torch.empty_like(scores)
        step = self.dense_chunk_rows
        for start in range(0, scores.shape[0], step):
            rows = slice(start, start + step)
            probs = torch.softmax(scores[rows], dim=1)
            for d in range(self.config.depth):
                g = self._lookup(self._table_index(cand[None, :] + bases[rows, d, None]))
                g_mass = (g * probs).sum(dim=1, keepdim=True)
                probs = probs * (1 + g - g_mass)
            out[rows] = _finite_log(probs)
        return out

    def _tournament_sparse(self, scores: torch.Tensor, finite: torch.Tensor,
                           hashes: list[int]) -> torch.Tensor:
        """Only the finite entries hashed, as one ragged list over the batch: row sums by
        index_add, so no per-row loop. The rest stay at probability 0 (log written as finfo.min)."""
        row, col = finite.nonzero(as_tuple=True)
        x = scores[row, col]
        num_rows = scores.shape[0]
        row_max = torch.full((num_rows,), float("-inf"), device=x.device, dtype=x.dtype)
        row_max = row_max.scatter_reduce(0, row, x, reduce="amax")
        e = torch.exp(x - row_max[row])
        total = torch.zeros(num_rows, device=x.device, dtype=x.dtype).index_add_(0, row, e)
        probs = e / total[row]
        bases = self._bases(hashes)
        cand = self._candidates(scores.shape[1])[col]
        for d in range(self.config.depth):
            g = self._lookup(self._table_index(cand + bases[row, d]))
            g_mass = torch.zeros(num_rows, device=x.device, dtype=x.dtype)
            g_mass.index_add_(0, row, g * probs)
            probs = probs * (1 + g - g_mass[row])
        out = torch.full_like(scores, torch.finfo(scores.dtype).min)
        out[row, col] = _finite_log(probs)
        return out


def _low32(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of int64 values as int32 (two's complement wrap)."""
    return x.bitwise_and(0xFFFFFFFF).to(torch.int32)


def _finite_log(probs: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log(probs)
    return torch.where(torch.isfinite(log_probs), log_probs, torch.finfo(log_probs.dtype).min)
