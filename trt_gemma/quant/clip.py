"""AWQ's weight clipping search (llm-awq ``auto_clip``): shrink each group's range if it helps.

Round-to-nearest INT4 spends its 16 levels on a group's full [min, max]; one outlier weight
stretches the step for the other 127. Clipping the range to ``ratio * [min, max]`` makes the
outlier's error larger and everyone else's smaller. For each (output row, input group) this tries
``ratio = 1, 1 - 1/n_grid, ..., 1 - max_shrink`` and keeps the one minimising the group's share of
the output error on calibration inputs, ``mean_n (x_g . (w_g - Q(clip(w_g))))^2``. ``ratio = 1``
(no clipping) is always a candidate, so the result is never worse than RTN on those inputs.

Applied after the AWQ scale (to ``W * s``, with inputs ``x / s``); returns the clipped weight, which
the ordinary quantizer then turns into codes and (smaller) scales: no new format.
"""

from __future__ import annotations

import torch

from trt_gemma.quant.int4 import fake_quantize_int4


def _clip(w: torch.Tensor, ratio: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """w [out, G, gs] clipped per group to ratio [out, G, 1] of its range."""
    if symmetric:
        c = w.abs().amax(dim=-1, keepdim=True) * ratio
        return torch.maximum(torch.minimum(w, c), -c)
    hi = w.amax(dim=-1, keepdim=True) * ratio
    lo = w.amin(dim=-1, keepdim=True) * ratio
    return torch.maximum(torch.minimum(w, hi), lo)


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,  # [out, in] float, AWQ scale already applied
    inputs: torch.Tensor,  # [n_tokens, in] calibration inputs (divided by the AWQ scale)
    group_size: int,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 256,
    seed: int = 0,
) -> torch.Tensor:  # [out, in] fp32 clipped weight
    """The weight with each group clipped to its best ratio (see the module docstring).

    Groups must tile the input exactly (``in % group_size == 0``); otherwise the weight comes back
    unclipped. Cost: ``n_grid * max_shrink`` fake quantizations and ``[tokens, out, groups]``
    contractions over ``max_tokens`` sampled tokens.
    """
    w = weight.float()
    out, k = w.shape
    if k % group_size:
        return w
    groups = k // group_size
    x = inputs.reshape(-1, k).float()
    if x.shape[0] > max_tokens:
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        x = x[pick[:max_tokens].to(x.device)]
    xg = x.view(-1, groups, group_size)  # [n, G, gs]
    # Rows in chunks: the [tokens, rows, groups] contractions stay under ~64 MiB on any model.
    chunk = max(1, (16 << 20) // max(1, xg.shape[0] * groups))
    clipped = [_search_rows(w[r:r + chunk].view(-1, groups, group_size), xg, symmetric,
                            scale_dtype, n_grid, max_shrink) for r in range(0, out, chunk)]
    return torch.cat(clipped).reshape(out, k)


def _search_rows(wg: torch.Tensor, xg: torch.Tensor, symmetric: bool,
                 scale_dtype: torch.dtype | None, n_grid: int,
                 max_shrink: float) -> torch.Tensor:  # [rows, G, gs]
    rows, groups, group_size = wg.shape
    ref = torch.einsum("ngk,ogk->nog", xg, wg)
    dev = wg.device
    best_err = torch.full((rows, groups), float("inf"), device=dev)
    best_ratio = torch.ones(rows, groups, 1, device=dev)
    for i in range(int(max_shrink * n_grid) + 1):
        ratio = torch.full((rows, groups, 1), 1.0 - i / n_grid, device=dev)
        q = fake_quantize_int4(_clip(wg, ratio, symmetric).reshape(rows, -1), group_size,
                               symmetric=symmetric, scale_dtype=scale_dtype)
        err = torch.einsum("ngk,ogk->nog", xg, q.view(rows, groups, group_size)) - ref
        err = err.pow(2).mean(dim=0)  # [rows, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better[..., None], ratio, best_ratio)
    return _clip(wg, best_ratio, symmetric)
