"""Exact greedy tokens without running the full LM head in the model's precision (CPU).

Gemma's LM head (262144 x 640 on the 270M) is most of a decode step's FLOPs, and a greedy row
needs only its argmax. An integer pre-pass screens the vocabulary: INT8 weights (per-token scales)
times activations quantized per row to integers, through FBGEMM's int8 GEMM (x86 VNNI / AVX2:
measured 2-3x faster than the bf16 GEMM on 2 cores). A rigorous bound on the pre-pass's error
keeps every token that could still be the argmax; only those few (a median of ~13 of 262144 on
real text) are computed exactly, in fp32 from the model's own weights, and rounded to the model's
dtype as its GEMM would; their argmax (lowest id on ties, as ``torch.argmax``) is the token.

Activations. Row r is scaled by ``s_r = amax_r / 63`` to ``z`` and written as two integer levels,
``z ~ q1 + q2 / 64`` with ``|q1| <= 63``, ``|q2| <= 32``: one level of 7 bits leaves thousands of
candidates (Gemma's final hidden state has amax/rms ~10), two leave a dozen. Both levels go through
one GEMM as stacked rows. The argmax does not depend on the positive ``s_r``, so all bounds are in
units of ``1/s_r``. FBGEMM quantizes its float input per tensor; one extra row holding -64 and 63
makes that quantization the identity (scale 1, zero point 64), and ``reduce_range`` (7-bit
inputs) keeps its u8 x s8 pair sums inside int16 on CPUs without VNNI: the integer products are
exact, and only the final fp32 scaling rounds (checked by tests/test_runtime_engine.py).

Bound, for token t with exact weights ``W_t``, int8 approximation ``Ŵ_t`` (``R_t = W_t - Ŵ_t``),
``q = q1 + q2/64``, ``e = z - q``, K = hidden size, γ = K * 2^-24, and the exact logit ``c_t``
computed in fp32 and rounded to the model dtype (unit roundoff ``u``: 2^-8 bf16, 2^-11 fp16,
0 fp32):

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
_MAX_CANDIDATES = 1024  # more than this for a row (near-uniform logits): its full exact logits
_LEVEL1, _LEVEL2 = 63, 64  # |q1| <= 63; q2 = round(64 * remainder), |q2| <= 32
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


def greedy_head_for(lm_head: torch.Tensor) -> GreedyHead:
    screen = _CACHE.get(lm_head)  # holds no reference to the head: the key can still die
    if screen is None:
        screen = _CACHE[lm_head] = Screen.build(lm_head)
    return GreedyHead(lm_head, screen)


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
    packed: list  # FBGEMM packed int8 weights, one per chunk
    token_ids: torch.Tensor  # [vocab] original id of each sorted row
    max_residual: torch.Tensor  # [chunks] max ||R_t||
    max_weight: torch.Tensor  # [chunks] max ||W_t||
    max_quantized: torch.Tensor  # [chunks] max ||Ŵ_t||

    @classmethod
    def build(cls, lm_head: torch.Tensor, chunk: int = CHUNK) -> Screen:
        w = lm_head.float()
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
        return cls(chunk, packed, order, torch.stack(max_r), torch.stack(max_w),
                   torch.stack(max_q))


def screen_rows(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    """The GEMM input for hidden [M, K]: [2M + 1, K] integer-valued floats (level 1 rows, level 2
    rows, the row that pins FBGEMM's quantization to the identity) and per-row ||q||, ||e||,
    ||z||."""
    h = hidden.float()
    s = (h.abs().amax(dim=1, keepdim=True) / _LEVEL1).clamp(min=1e-30)
    z = h / s
    q1 = z.round()
    rest = (z - q1) * _LEVEL2
    q2 = rest.round()
    pin = torch.zeros(1, h.shape[1])
    pin[0, :2] = torch.tensor([-64.0, 63.0])
    q = q1 + q2 / _LEVEL2
    e = (rest - q2) / _LEVEL2
    return torch.cat([q1, q2, pin]), q.norm(dim=1), e.norm(dim=1), z.norm(dim=1)


class GreedyHead:
    def __init__(self, lm_head: torch.Tensor, screen: Screen | None = None):
        self.lm_head = lm_head  # [vocab, hidden], model dtype
        self.screen = screen or Screen.build(lm_head)
        self.gamma = lm_head.shape[1] * 2.0**-24
        self.roundoff = 1.02 * _ROUNDOFF[lm_head.dtype]

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> list[int]:  # hidden [M, hidden] -> M token ids
        sc, m = self.screen, hidden.shape[0]
        x, q_norm, e_norm, z_norm = screen_rows(hidden)
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
            out = torch.ops.quantized.linear_dynamic(x, packed, True)
            p = torch.add(out[:m], out[m:2 * m], alpha=1.0 / _LEVEL2)  # [M, chunk]
            best = p.amax(dim=1)
            # the chunk's best token's exact logit is at least this: so is the row's argmax's
            low = best - base[:, c] - self.roundoff * (best.abs() + base[:, c])
            floor = low if floor is None else torch.maximum(floor, low)
            r, t = (p >= (best - loose[:, c])[:, None]).nonzero(as_tuple=True)
            rows.append(r)
            cols.append(t + c * sc.chunk)
            values.append(p[r, t])
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
        exact = (hidden[r].float() * self.lm_head[t].float()).sum(dim=1)
        exact = exact.to(self.lm_head.dtype).float()  # rounded as the model's GEMM rounds
        best = torch.full((m,), -torch.inf).scatter_reduce(0, r, exact, "amax")
        at_best = exact == best[r]
        tokens = torch.full((m,), self.lm_head.shape[0], dtype=torch.long)
        tokens = tokens.scatter_reduce(0, r[at_best], t[at_best], "amin")  # lowest id on ties
        for row in crowded.nonzero().flatten().tolist():
            tokens[row] = F.linear(hidden[row:row + 1], self.lm_head).argmax()
        return tokens.tolist()
