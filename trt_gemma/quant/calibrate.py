"""Calibration: run the model on text and record what quantization needs to know.

For every group of linears that read the same input (q/k/v, gate/up, o_proj, down_proj, and the LM
head when asked) it records the input's ``amax`` (FP8 static activation scale), the per-channel
``mean |x|`` (AWQ's saliency statistic) and a sample of up to ``max_rows`` input rows (the
activations AWQ measures its output error on) and, for GPTQ, the sum of ``x.T x`` over *every*
calibration token (``[in, in]`` fp32): by default only when all groups' matrices together fit in
``HESSIAN_BUDGET_BYTES`` (Gemma 3 270M: 0.4 GiB, 1B: 5.4 GiB, Gemma 2 2B: 10 GiB), otherwise
GPTQ falls back to ``x.T x`` of the sampled rows. Per layer it records ``amax`` of the keys and
values the KV cache stores (FP8 KV-cache scales).

``model.py`` needs no hooks: the linears are wrapped in ``RecordingLinear`` objects, which
``ops.linear`` calls through their ``.linear(x)`` like any quantized weight, and the cache is a
``ContiguousKVCache`` whose ``attend`` first notes k and v. The wrapped weights make the model skip
its q/k/v and gate/up fusion (three GEMMs instead of one): fine for a few thousand tokens.

Text is split into windows of ``window`` tokens, each starting with BOS and run as one prefill, so
positions and attention match what the model sees at run time (including the BOS token, whose
outsized activations are part of what a static scale must cover).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trt_gemma import ops
from trt_gemma.config import GemmaConfig
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.model import GemmaModel

HESSIAN_BUDGET_BYTES = 8 << 30  # all groups' x.T x together, fp32


@dataclass(frozen=True)
class LinearGroup:
    """Linears reading one input: they share an AWQ scale and an FP8 activation scale."""

    name: str  # e.g. "layers.3.self_attn.qkv"
    weights: tuple[str, ...]  # canonical weight names ("layers.3.self_attn.q_proj.weight", ...)
    layer: int | None  # decoder layer index; None for the LM head


def linear_groups(config: GemmaConfig, lm_head: bool = False) -> list[LinearGroup]:
    """Every quantizable linear of the model, grouped by shared input, in forward order."""
    groups = []
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        attn = tuple(p + f"self_attn.{n}_proj.weight" for n in "qkv")
        mlp = (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        groups += [
            LinearGroup(p + "self_attn.qkv", attn, i),
            LinearGroup(p + "self_attn.o_proj", (p + "self_attn.o_proj.weight",), i),
            LinearGroup(p + "mlp.gate_up", mlp, i),
            LinearGroup(p + "mlp.down_proj", (p + "mlp.down_proj.weight",), i),
        ]
    if lm_head:
        groups.append(LinearGroup("lm_head", ("lm_head.weight",), None))
    return groups


@dataclass
class InputStats:
    """Running statistics of one linear group's input x ``[tokens, in]``."""

    amax: float = 0.0  # max |x| over every token seen
    abs_sum: torch.Tensor | None = None  # [in] fp32 sum of |x| per channel
    count: int = 0  # tokens seen
    rows: list[torch.Tensor] = field(default_factory=list)  # sampled rows, fp32 on CPU
    xtx: torch.Tensor | None = None  # [in, in] fp32 sum of x.T x over every token (GPTQ's H)
    hessian: bool = False  # accumulate xtx

    def add(self, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        xf = x.detach().reshape(-1, x.shape[-1]).float()
        if self.hessian:
            h = (xf.T @ xf).cpu()
            self.xtx = h if self.xtx is None else self.xtx + h
        a = xf.abs()
        self.amax = max(self.amax, float(a.max())) if xf.numel() else self.amax
        s = a.sum(dim=0).cpu()
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += xf.shape[0]
        if keep is not None and keep.numel():
            self.rows.append(xf[keep.to(xf.device)].cpu())

    @property
    def mean_abs(self) -> torch.Tensor:  # [in]
        return self.abs_sum / max(self.count, 1)

    def activations(self) -> torch.Tensor:  # [n_sampled, in] fp32
        return torch.cat(self.rows, dim=0)


@dataclass
class CalibrationStats:
    """What one calibration run measured (the converter's only view of the text)."""

    inputs: dict[str, InputStats]  # LinearGroup.name -> stats of its input
    k_amax: torch.Tensor  # [num_layers] fp32: max |k| the cache stores (after QK-norm and rope)
    v_amax: torch.Tensor  # [num_layers] fp32
    num_tokens: int  # tokens run through the model, BOS of each window included
    num_windows: int
    # How the run was made, so a converter can re-run it on partly quantized weights.
    windows: list[list[int]] = field(default_factory=list, repr=False)
    max_rows: int = 1024
    dtype: torch.dtype = torch.float32
    hessians: bool = False

    def summary(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "num_windows": self.num_windows,
                "k_amax_max": float(self.k_amax.max()), "v_amax_max": float(self.v_amax.max())}


class _Run:
    """Per-forward state the recorders share: which rows of the current window to sample."""

    keep: torch.Tensor | None = None


class RecordingLinear:
    """A dense weight that records its input before ``F.linear`` (a stand-in weight object)."""

    def __init__(self, weight: torch.Tensor, stats: InputStats | None, run: _Run):
        self.weight, self.stats, self.run = weight, stats, run

    def to(self, device: torch.device | str) -> RecordingLinear:
        self.weight = self.weight.to(device)
        return self

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:
            self.stats.add(x, self.run.keep)
        return ops.linear(x, self.weight)


class _RecordingCache(ContiguousKVCache):
    def __init__(self, config: GemmaConfig, max_len: int, dtype, device, k_amax, v_amax):
        super().__init__(config, max_len, dtype, device)
        self.k_amax, self.v_amax = k_amax, v_amax

    def attend(self, layer, q, k, v, **kw):
        self.k_amax[layer] = max(float(self.k_amax[layer]), float(k.detach().abs().max()))
        self.v_amax[layer] = max(float(self.v_amax[layer]), float(v.detach().abs().max()))
        return super().attend(layer, q, k, v, **kw)


def calibration_windows(token_ids: Sequence[int], bos_id: int, window: int,
                        max_tokens: int) -> list[list[int]]:
    """Windows ``[BOS] + next window - 1 text tokens`` covering the first max_tokens in total."""
    if window < 2:
        raise ValueError(f"calibration window must be >= 2 tokens, got {window}")
    ids = [t for t in token_ids if t != bos_id]
    windows, pos, total = [], 0, 0
    while pos < len(ids) and total < max_tokens:
        take = min(window - 1, len(ids) - pos, max_tokens - total - 1)
        if take <= 0:
            break
        windows.append([bos_id, *ids[pos:pos + take]])
        pos += take
        total += take + 1
    return windows


@torch.inference_mode()
def calibrate(
    config: GemmaConfig,
    weights: dict[str, torch.Tensor],  # canonical dense tensors (not modified)
    windows: Iterable[list[int]],
    *,
    groups: list[LinearGroup],
    max_rows: int = 1024,
    hessians: bool | None = None,  # None: when they fit HESSIAN_BUDGET_BYTES
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,  # called with each window's token count
) -> CalibrationStats:
    """Run the model over the windows and collect ``CalibrationStats`` for ``groups``.

    ``max_rows`` rows of each group's input are kept, sampled uniformly (seeded) over all tokens,
    so memory is ``max_rows * sum(in_features)`` floats whatever the text length. ``hessians``
    adds ``x.T x`` over all tokens per group (``sum(in_features^2)`` floats).
    """
    windows = [list(w) for w in windows]
    if not windows:
        raise ValueError("calibrate: no calibration tokens")
    total = sum(len(w) for w in windows)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=gen)[:max_rows].sort().values  # global token indices
    run = _Run()
    if hessians is None:
        need = sum(4 * weights[g.weights[0]].shape[1] ** 2 for g in groups
                   if g.weights[0] in weights)
        hessians = need <= HESSIAN_BUDGET_BYTES
    stats = {g.name: InputStats(hessian=hessians) for g in groups}
    owner = {g.weights[0]: g.name for g in groups}  # the first linear of a group records for it
    model_weights: dict[str, Any] = {}
    for name, t in weights.items():
        t = t.to(device=device, dtype=dtype)
        is_linear = any(name in g.weights for g in groups) and name != "lm_head.weight"
        if is_linear:
            model_weights[name] = RecordingLinear(t, stats.get(owner.get(name)), run)
        else:
            model_weights[name] = t
    model = GemmaModel.from_state_dict(config, model_weights, dtype=dtype, device=device)
    head = next((g for g in groups if g.name == "lm_head"), None)
    if head is not None:  # tied or not, the head's input is the final hidden state
        model.lm_head = RecordingLinear(model.lm_head, stats["lm_head"], run)
    n = config.num_hidden_layers
    k_amax, v_amax = torch.zeros(n), torch.zeros(n)
    start = 0
    for ids in windows:
        lo = int(torch.searchsorted(chosen, start))
        hi = int(torch.searchsorted(chosen, start + len(ids)))
        run.keep = chosen[lo:hi] - start
        cache = _RecordingCache(config, len(ids), dtype, device, k_amax, v_amax)
        hidden = cache.forward(model, torch.tensor(ids, device=device))
        if head is not None:
            model.compute_logits(hidden)
        start += len(ids)
        if progress is not None:
            progress(len(ids))
    return CalibrationStats(inputs=stats, k_amax=k_amax, v_amax=v_amax, num_tokens=total,
                            num_windows=len(windows), windows=windows, max_rows=max_rows,
                            dtype=dtype, hessians=hessians)
