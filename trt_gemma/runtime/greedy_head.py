"""Exact greedy tokens without running the full LM head in the model's precision (CPU).

Gemma's LM head (262144 x 640 on the 270M) is most of a decode step's FLOPs, and a greedy row
needs only its argmax. An integer pre-pass screens the vocabulary: INT8 weights (per-token scales)
times activations quantized per row to integers, through FBGEMM's int8 GEMM (x86 VNNI / AVX2:
measured 2-3x faster than the bf16 GEMM on 2 cores). A rigorous bound on the pre-pass's error
keeps every token that could still be the argmax; only those few (a few dozen of 262144 on real
text) are computed exactly, in fp32 from the model's own weights, and rounded to the model's
dtype as its GEMM would; their argmax (lowest id on ties, as ``torch.argmax``) is the token.

Activations. Row r is scaled by ``s_r`` (its amax over the largest integer) to ``z`` and rounded to
integers ``q``; the argmax does not depend on the positive ``s_r``, so all bounds are in units of
``1/s_r``. FBGEMM quantizes its float input per tensor; one extra row holding the integer range's
two ends makes that quantization the identity (scale 1), so the integer products are exact and
only the final fp32 scaling rounds (checked by tests/test_runtime_engine.py). Two modes:

- two 7-bit levels, ``z ~ q1 + q2 / 64`` (``|q1| <= 63``, ``|q2| <= 32``), as stacked rows of one
  GEMM, with ``reduce_range``: 7-bit inputs keep FBGEMM's u8 x s8 pair sums inside int16 on any
  x86 CPU. One 7-bit level would leave thousands of candidates (Gemma's final hidden state has a
  few huge channels, amax/rms ~10); two leave a dozen, for twice the rows.
- one 8-bit level (``|q| <= 127``), where it takes fewer rows, with SmoothQuant-style channel
  factors ``f`` (screen ``h / f`` against ``W * f``, ``f = sqrt(amax(h) / amax(W))`` per channel
  from the model's final hidden states on bundled text): a few dozen candidates for half the rows.
  8-bit inputs can saturate FBGEMM's int16 pair sums, depending on the CPU and on the kernel FBGEMM
  picks for the row count (one of our VMs: its 2-row kernel saturated, its 33-row one did not; a
  later one with AVX-512 VNNI: no row count did), so this level runs only at row counts a worst-case
  probe at build found exact, padding the step's rows up to one of them, and only where that is
  fewer rows than two levels take (or the step has 12+ rows).

Bound, for token t with (smoothed) weights ``W_t``, their int8 approximation ``Ŵ_t``
(``R_t = W_t - Ŵ_t``), the integers ``q`` (two levels: ``q1 + q2/64``), ``e = z - q``, K = hidden
size, γ = K * 2^-24, and the exact logit ``c_t`` computed in fp32 and rounded to the model dtype
(unit roundoff ``u``: 2^-8 bf16, 2^-11 fp16, 0 fp32):

    |c_t - p_t| <= ||q||·||R_t|| + ||e||·||W_t||       weights, activations quantized
                 + γ·||z||·||W_t||                      fp32 accumulation of the exact logit
                 + u·|c_t|                              its rounding to the model dtype
                 + 2^-20·||q||·||Ŵ_t||                   fp32 scaling of the integer products

(Cauchy-Schwarz). The vocabulary is sorted by ||R_t|| and screened in chunks, each with its own
maximum norms, so most tokens get a bound close to their own. The final soft-cap (Gemma 2) is
monotonic: the argmax is unchanged.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

CHUNK = 32768  # vocabulary rows per screening GEMM: its [rows, CHUNK] output stays in cache
# More than this for a row (near-uniform logits): that row takes the full head. Real text gives a
# median of ~12 candidates, and a handful of rows per thousand between 1k and 4k; one row of the
# full 262k head costs as much as ~20k candidates computed exactly.
_MAX_CANDIDATES = 8192
_EXACT_SLICE = 2048  # candidates per exact-logit slice: its fp32 temporaries stay ~5 MB
_LEVEL1, _LEVEL2 = 63, 64  # two levels: |q1| <= 63; q2 = round(64 * remainder), |q2| <= 32
_SMOOTHING_TOKENS = 512  # tokens of bundled text whose final hidden states give the factors
# One 8-bit level pads a step of M rows to the smallest of these row counts above M that the
# probe found exact (the last row pins the quantization), where that is fewer than the 2M + 1
# rows of two levels, or M >= _ONE_LEVEL_MIN. 270M bf16 head, 2 cores (padded to 33 before):
# 8 rows 17.1 -> 12.5 ms, 12 rows 27.9 -> 15.1 ms, 16 rows 28.4 -> 18.6 ms.
_ONE_LEVEL_ROWS = (3, 5, 9, 13, 17, 25, 33, 49, 65)
_ONE_LEVEL_MIN = 12
_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}

# Built once per head tensor (a few seconds for Gemma 3 270M) and shared by every engine on that
# model; weak, so it goes with the model. Inference never writes the head in place.
_CACHE = WeakIdKeyDictionary()  # keyed by tensor identity (tensors compare elementwise)


def available(lm_head) -> bool:
    """Dense CPU head, and a PyTorch with FBGEMM's dynamic int8 linear."""
    return (isinstance(lm_head, torch.Tensor) and lm_head.device.type == "cpu"
            and lm_head.dtype in _ROUNDOFF
            and "fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_dynamic"))


def greedy_head_for(model, tokenizer=None) -> GreedyHead:
    """The model's greedy head; its one-level path needs a tokenizer (for the bundled text that
    gives the smoothing factors) and row counts the probe found exact on this CPU."""
    lm_head = model.lm_head
    screen = _CACHE.get(lm_head)  # holds no reference to the head: the key can still die
    if screen is None:
        rows = _exact_8bit_rows(*lm_head.shape)
        factors = None
        if tokenizer is not None and rows:
            factors = smoothing_factors(_final_hidden_states(model, tokenizer), lm_head)
        screen = _CACHE[lm_head] = Screen.build(lm_head, factors=factors,
                                                one_level_rows=rows if factors is not None else ())
    return GreedyHead(lm_head, screen)


def smoothing_factors(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """Per channel ``sqrt(amax(hidden) / amax(W))`` (SmoothQuant's alpha 0.5), median 1:
    hidden [N, K] final hidden states, lm_head [vocab, K]. Only speed depends on them."""
    act = hidden.float().abs().amax(dim=0).clamp(min=1e-6)
    weight = lm_head.float().abs().amax(dim=0).clamp(min=1e-6)
    f = (act / weight).sqrt()
    return f / f.median()


def _final_hidden_states(model, tokenizer) -> torch.Tensor:
    from importlib import resources

    from trt_gemma.kv_cache import ContiguousKVCache

    text = resources.files("trt_gemma").joinpath("data", "calibration.txt").read_text("utf-8")
    ids = torch.tensor(tokenizer.encode(text)[:_SMOOTHING_TOKENS], device=model.device)
    with torch.inference_mode():
        cache = ContiguousKVCache(model.config, len(ids), model.dtype, model.device)
        return cache.forward(model, ids)


_PROBED: dict[tuple[int, int], tuple[int, ...]] = {}


def _exact_8bit_rows(vocab: int, k: int) -> tuple[int, ...]:
    """Those of _ONE_LEVEL_ROWS at which FBGEMM's int8 GEMM takes full 8-bit inputs exactly, for
    every chunk shape of a [vocab, k] head: the worst case (255 * 127 on every u8 x s8 pair)
    against the exact sums (up to the fp32 rounding of large ones)."""
    sizes = {min(CHUNK, vocab), vocab % CHUNK or CHUNK} - {0}
    exact = set(_ONE_LEVEL_ROWS)
    for n in sizes:
        if (n, k) not in _PROBED:
            w = torch.full((n, k), 127.0)
            w[1::2] = -127.0
            with _fbgemm():
                qw = torch.quantize_per_channel(w, torch.ones(n, dtype=torch.float64),
                                                torch.zeros(n, dtype=torch.long), 0, torch.qint8)
                packed = torch.ops.quantized.linear_prepack(qw, None)
            ok = []
            for rows in _ONE_LEVEL_ROWS:
                x = torch.full((rows, k), 127.0)
                x[1::2] = -127.0
                x[-1, 0] = -128.0
                out = torch.ops.quantized.linear_dynamic(x, packed, False).double()
                want = x.double() @ w.double().t()  # saturation is off by >= 1e-4 relative
                if ((out - want).abs() <= want.abs() * 2.0**-22).all():
                    ok.append(rows)
            _PROBED[(n, k)] = tuple(ok)
        exact &= set(_PROBED[(n, k)])
    return tuple(sorted(exact))


@contextlib.contextmanager
def _fbgemm():
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():  # quantized tensor constructors warn of deprecation
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = engine


@dataclass(frozen=True)
class Screen:
    """The int8 head in chunks of the vocabulary sorted by weight residual, with each chunk's
    largest norms (the bound's per-chunk constants)."""

    chunk: int  # vocabulary rows per packed weight
    factors: torch.Tensor | None  # [K] channel smoothing of the screen (None: none)
    one_level_rows: tuple[int, ...]  # padded row counts where one 8-bit level is exact
    packed: list  # FBGEMM packed int8 weights, one per chunk
    token_ids: torch.Tensor  # [vocab] original id of each sorted row
    max_residual: torch.Tensor  # [chunks] max ||R_t||
    max_weight: torch.Tensor  # [chunks] max ||W_t||
    max_quantized: torch.Tensor  # [chunks] max ||Ŵ_t||

    @classmethod
    def build(cls, lm_head: torch.Tensor, chunk: int = CHUNK,
              factors: torch.Tensor | None = None,
              one_level_rows: tuple[int, ...] = ()) -> Screen:
        w = lm_head.float() if factors is None else lm_head.float() * factors
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-30)
        with _fbgemm():
            def quantized(rows):  # FBGEMM's int8 rows (scale, zero point 0) and its weights
                qw = torch.quantize_per_channel(w[rows], scale[rows].double(),
                                                torch.zeros(len(rows), dtype=torch.long), 0,
                                                torch.qint8)
                return qw, qw.int_repr().float() * scale[rows, None]

            # sort by the residual of the weights FBGEMM will use (from its own integers)
            residual = (w - quantized(torch.arange(len(w)))[1]).norm(dim=1)
            order = residual.argsort()
            packed, max_r, max_w, max_q = [], [], [], []
            for start in range(0, w.shape[0], chunk):
                rows = order[start:start + chunk]
                qw, approx = quantized(rows)
                packed.append(torch.ops.quantized.linear_prepack(qw, None))
                max_r.append(residual[rows].max())
                max_w.append(w[rows].norm(dim=1).max())
                max_q.append(approx.norm(dim=1).max())
        return cls(chunk, factors, tuple(one_level_rows), packed, order, torch.stack(max_r),
                   torch.stack(max_w), torch.stack(max_q))


def screen_rows(hidden: torch.Tensor, one_level_rows: int = 0) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GEMM input for hidden [M, K] (already divided by any factors), integer-valued floats:
    one 8-bit level padded to ``one_level_rows`` rows, or (0) two levels, level 1 rows then
    level 2 rows; either way followed by the row that pins FBGEMM's input quantization to the
    identity. And per row ||q||, ||e||, ||z||."""
    h = hidden.float()
    m, k = h.shape
    one_level = one_level_rows > 0
    s = (h.abs().amax(dim=1, keepdim=True) / (127 if one_level else _LEVEL1)).clamp(min=1e-30)
    z = h / s
    q1 = z.round()
    if one_level:
        x = torch.zeros(one_level_rows, k)
        x[:m] = q1
        x[-1, :2] = torch.tensor([-128.0, 127.0])
        return x, q1.norm(dim=1), (z - q1).norm(dim=1), z.norm(dim=1)
    rest = (z - q1) * _LEVEL2
    q2 = rest.round()
    pin = torch.zeros(1, k)
    pin[0, :2] = torch.tensor([-64.0, 63.0])
    q = q1 + q2 / _LEVEL2
    e = (rest - q2) / _LEVEL2
    return torch.cat([q1, q2, pin]), q.norm(dim=1), e.norm(dim=1), z.norm(dim=1)


_BLOCK = 64  # columns per block of _above's first pass


def _above(p: torch.Tensor, margin: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries of p [M, N] within ``margin`` [M] of their row's max: (rows, cols, values) and
    the row maxima. A pass of block maxima finds the few blocks that hold such entries; only
    those are compared entry by entry (a full-width ``>=`` and ``nonzero`` cost ~3x more)."""
    m, n = p.shape
    if n % _BLOCK:
        best = p.amax(dim=1)
        r, t = (p >= (best - margin)[:, None]).nonzero(as_tuple=True)
        return r, t, p[r, t], best
    blocks = p.reshape(m, n // _BLOCK, _BLOCK)
    block_max = blocks.amax(dim=2)  # [M, N / BLOCK]
    best = block_max.amax(dim=1)
    threshold = best - margin
    hit_r, hit_b = (block_max >= threshold[:, None]).nonzero(as_tuple=True)
    cand = blocks[hit_r, hit_b]  # [hits, BLOCK]
    i, j = (cand >= threshold[hit_r][:, None]).nonzero(as_tuple=True)
    return hit_r[i], hit_b[i] * _BLOCK + j, cand[i, j], best


class GreedyHead:
    def __init__(self, lm_head: torch.Tensor, screen: Screen | None = None):
        self.lm_head = lm_head  # [vocab, hidden], model dtype
        self.screen = screen or Screen.build(lm_head)
        self.gamma = lm_head.shape[1] * 2.0**-24
        self.roundoff = 1.02 * _ROUNDOFF[lm_head.dtype]

    def worthwhile_rows(self) -> int:
        """Rows per step up to which this head beats the full one, measured on 2 cores with
        Gemma 3 270M: bf16 (one level) 32 rows 34 vs 48 ms, 64 rows even; bf16 (two levels only)
        ~12 rows; fp32 every size tried (two levels, 32 rows: 54 vs 133 ms)."""
        if self.lm_head.dtype == torch.float32:
            return 64
        return 32 if 33 in self.screen.one_level_rows else 10

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> list[int]:  # hidden [M, hidden] -> M token ids
        sc, m = self.screen, hidden.shape[0]
        # one 8-bit level at the smallest probed row count that fits m + the pin, if worth it
        padded = min((r for r in sc.one_level_rows if r > m), default=0)
        if padded >= 2 * m + 1 and m < _ONE_LEVEL_MIN:
            padded = 0
        one_level = padded > 0
        x, q_norm, e_norm, z_norm = screen_rows(
            hidden if sc.factors is None else hidden.float() / sc.factors, padded)
        # Per row and chunk: the bound's part that does not depend on c_t (base), and a bound on
        # every |p_t| and |c_t| of the row (Cauchy-Schwarz), for the per-chunk pre-filter.
        base = 1.01 * (q_norm[:, None] * sc.max_residual
                       + (e_norm + self.gamma * z_norm)[:, None] * sc.max_weight
                       + 2.0**-20 * q_norm[:, None] * sc.max_quantized) + 1e-6  # [M, chunks]
        magnitude = 1.01 * torch.maximum(q_norm * sc.max_quantized.max(),
                                         z_norm * sc.max_weight.max())  # [M]
        loose = 2 * base + self.roundoff * 2 * (magnitude[:, None] + base)
        rows, cols, values, chunk_of, floor = [], [], [], [], None
        for c, packed in enumerate(sc.packed):
            out = torch.ops.quantized.linear_dynamic(x, packed, not one_level)
            p = out[:m] if one_level else torch.add(out[:m], out[m:2 * m], alpha=1.0 / _LEVEL2)
            r, t, v, best = _above(p, loose[:, c])
            # the chunk's best token's exact logit is at least this: so is the row's argmax's
            low = best - base[:, c] - self.roundoff * (best.abs() + base[:, c])
            floor = low if floor is None else torch.maximum(floor, low)
            rows.append(r)
            cols.append(t + c * sc.chunk)
            values.append(v)
            chunk_of.append(torch.full_like(r, c))
        r, t, p, c = (torch.cat(v) for v in (rows, cols, values, chunk_of))
        b = base[r, c]
        keep = p + b + self.roundoff * (p.abs() + b) >= floor[r]
        r, t = r[keep], sc.token_ids[t[keep]]
        counts = torch.bincount(r, minlength=m)
        crowded = counts > _MAX_CANDIDATES
        if crowded.any():  # drop those rows' candidates: they get the full head below
            ok = ~crowded[r]
            r, t = r[ok], t[ok]
        # index_select, not advanced indexing: ~10x faster for rows of a [262144, 640] head
        exact = torch.cat([
            (hidden.index_select(0, r[i:i + _EXACT_SLICE]).float()
             * self.lm_head.index_select(0, t[i:i + _EXACT_SLICE]).float()).sum(dim=1)
            for i in range(0, max(len(r), 1), _EXACT_SLICE)])
        exact = exact.to(self.lm_head.dtype).float()  # rounded as the model's GEMM rounds
        best = torch.full((m,), -torch.inf).scatter_reduce(0, r, exact, "amax")
        at_best = exact == best[r]
        tokens = torch.full((m,), self.lm_head.shape[0], dtype=torch.long)
        tokens = tokens.scatter_reduce(0, r[at_best], t[at_best], "amin")  # lowest id on ties
        for row in crowded.nonzero().flatten().tolist():
            tokens[row] = F.linear(hidden[row:row + 1], self.lm_head).argmax()
        return tokens.tolist()
