"""Exact greedy tokens without running the full LM head in the model's precision (CPU).

Gemma's LM head (262144 x 640 on the 270M) is most of a decode step, and a greedy row needs only
its argmax. An int8 copy of the head (``W = s*q + R``, per-token scales) approximates the logits
in half the bytes of bf16 (a quarter of fp32) through PyTorch's int8 weight-only CPU kernel with
bf16 activations. A rigorous bound E on the approximation's error keeps every token that could
still be the argmax (``pre_t + E_t >= max_u (pre_u - E_u)``: on real generations a median of 11
and at most ~100 of 262144); only those rows of the real head are computed in the model's dtype,
and their argmax (lowest id on ties, as ``torch.argmax``) is the token: the same token the full
head gives, up to the rounding differences any two GEMM kernels have.

Bound, for a row h (ĥ = h rounded to bf16) and token t, K = hidden size, γ = K * 2^-24:

    |pre_t - logit_t| <= ||ĥ||·||R_t||                   int8 rounding of the weights
                       + ||h - ĥ||·||W_t||                activations rounded to bf16
                       + 2^-8·1.01·|pre_t|                the kernel rounds its result to bf16
                       + γ·1.01·||h||·(||sq_t|| + ||W_t||)   fp32 accumulation, both sides
                       [+ 2^-8·1.01·|pre_t|               bf16 models round the logit too]

(norms are Euclidean, Cauchy-Schwarz). The kernel's fp32-accumulate-then-round behaviour is checked
by tests/test_runtime_engine.py. The final soft-cap (Gemma 2) is monotonic: argmax unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from trt_gemma.runtime.int8_decode import Int8RowWeight

_MAX_CANDIDATES = 1024  # more than this (a near-uniform row): compute the row's full logits

# Built once per head tensor (~3 s for Gemma 3 270M) and shared by every engine on that model;
# weak, so it goes with the model. Inference never writes the head in place.
_CACHE = WeakIdKeyDictionary()  # keyed by tensor identity (tensors compare elementwise)


def available(lm_head) -> bool:
    """Dense CPU head, and a PyTorch with the int8 weight-only CPU kernel."""
    return (isinstance(lm_head, torch.Tensor) and lm_head.device.type == "cpu"
            and hasattr(torch, "_weight_int8pack_mm"))


def greedy_head_for(lm_head: torch.Tensor) -> GreedyHead:
    derived = _CACHE.get(lm_head)  # holds no reference to the head: the key can still die
    if derived is None:
        derived = _CACHE[lm_head] = _derive(lm_head)
    return GreedyHead(lm_head, derived)


def _derive(lm_head: torch.Tensor) -> dict[str, torch.Tensor]:
    """The int8 head and the per-token norms the error bound needs."""
    w = lm_head.float()
    int8 = Int8RowWeight.from_dense(w, torch.bfloat16)  # the kernel takes bf16 activations
    q, scale = int8.q, int8.scale
    approx = int8.dequantize()
    norm_w = w.norm(dim=1)
    return {"q": q, "scale": scale, "norm_residual": (w - approx).norm(dim=1),
            "norm_w": norm_w, "norm_acc": 1.01 * (approx.norm(dim=1) + norm_w)}


class GreedyHead:
    def __init__(self, lm_head: torch.Tensor, derived: dict[str, torch.Tensor] | None = None):
        self.lm_head = lm_head  # [vocab, hidden], model dtype
        d = derived or _derive(lm_head)
        self.q, self.scale = d["q"], d["scale"]  # [vocab, hidden] int8, [vocab] bf16
        self.norm_residual, self.norm_w, self.norm_acc = (
            d["norm_residual"], d["norm_w"], d["norm_acc"])  # [vocab] each
        self.gamma = lm_head.shape[1] * 2.0**-24
        self.round = 2.0**-8 * (2.02 if lm_head.dtype == torch.bfloat16 else 1.01)

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> list[int]:  # hidden [M, hidden] -> M token ids
        hb = hidden.to(torch.bfloat16)
        pre = torch._weight_int8pack_mm(hb, self.q, self.scale).float()  # [M, vocab]
        h = hidden.float()
        a = hb.float().norm(dim=1, keepdim=True)  # [M, 1]
        d = (h - hb.float()).norm(dim=1, keepdim=True)
        g = self.gamma * h.norm(dim=1, keepdim=True)
        slack = pre.abs().mul_(self.round)
        slack.addcmul_(a, self.norm_residual).addcmul_(d, self.norm_w).addcmul_(g, self.norm_acc)
        slack.add_(1e-6)
        floor = (pre - slack).amax(dim=1, keepdim=True)  # the argmax's logit is at least this
        maybe = pre.add_(slack) >= floor
        tokens = []
        for row in range(hidden.shape[0]):
            cands = maybe[row].nonzero().squeeze(1)
            h_row = hidden[row:row + 1]
            if cands.numel() > _MAX_CANDIDATES:
                tokens.append(int(F.linear(h_row, self.lm_head).argmax()))
                continue
            exact = F.linear(h_row, self.lm_head[cands])[0]
            tokens.append(int(cands[exact.argmax()]))
        return tokens
