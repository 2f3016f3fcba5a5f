"""Block-wise refinement of INT4 scales: fit a quantized decoder layer to the float one.

AWQ and GPTQ each minimise one linear's output error on its own inputs. What the model feels is
the error of a whole decoder layer (norms, attention, GeGLU and the residual in between) and the
error the layers below have already added. So, as OmniQuant's learnable weight clipping and
AutoRound do, the continuous quantization parameters of one layer are fitted by gradient descent
to make that layer, fed the *quantized* model's hidden states, reproduce the *float* model's
output on the calibration windows:

    min  || layer_q(x_q) - layer_fp(x_fp) ||^2     over  scales [out, G] and pre_quant_scale [in]

The codes (GPTQ's) stay fixed, so the result is an ordinary ``Int4Weight`` with new scales: the
engine format, the kernels and the TensorRT-LLM export do not change. Each group scale and each
AWQ input scale gets a multiplicative factor ``exp(t)``, ``t`` starting at 0 (the AWQ + GPTQ
result); linears that share an input (q/k/v, gate/up) keep sharing one ``pre_quant_scale``.
Few parameters per layer (one per 128 weights) against ~34k calibration tokens (bundled): on the
270M the held-out and calibration texts gained alike, though not every unseen text gains as much
(docs/quantization.md has the measurements). ``fit_keeping_best``: Adam on random mini-batches of
windows; the loss on all windows is checked every ``eval_every`` steps, with the parameters
rounded to their storage dtype as the engine stores them, and the best point is kept (the
starting point included: refinement never returns a layer worse on calibration data).

The layer is ``model.decoder_layer``, the runtime's own forward, differentiated through; only the
attention backend is this module's (``WindowAttention``: windows side by side, no cache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trt_gemma import ops
from trt_gemma.config import GemmaConfig
from trt_gemma.kernels import reference
from trt_gemma.kernels.gemm_w4a16 import SYMMETRIC_ZERO, Int4Weight, unpack_int4
from trt_gemma.model import AttentionBackend, LayerWeights, NormScales, decoder_layer

# Canonical names of a decoder layer's linears, and which of them share their input.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
                 "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}


@dataclass(frozen=True)
class RefineOptions:
    steps: int = 40  # Adam steps per layer
    lr: float = 0.005  # on the log of the factors; decays linearly to 0
    batch_windows: int = 4  # calibration windows per step
    eval_every: int = 10  # steps between full-calibration loss checks (best point kept)
    seed: int = 0


@dataclass
class RefineResult:
    weights: dict[str, Int4Weight]  # canonical linear name -> refined weight
    loss_before: float  # mean squared error of the layer output on all calibration windows
    loss_after: float


class WindowAttention(AttentionBackend):
    """Differentiable attention backend for ``[windows * length]`` packed tokens: each window is
    its own sequence starting at position 0, causal (and windowed where the layer is)."""

    def __init__(self, num_windows: int, length: int):
        self.num_windows, self.length = num_windows, length

    def attend(self, layer, q, k, v, *, scale, sliding_window, softcap):
        b, t = self.num_windows, self.length
        q, k, v = (x.reshape(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        pos = torch.arange(t, device=q.device)
        visible = pos[None, :] <= pos[:, None]  # [query, key]
        if sliding_window is not None:
            visible &= pos[None, :] > pos[:, None] - sliding_window
        if softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale,
                                                 enable_gqa=True)
        else:  # Gemma 2: tanh soft-cap on the scores, which SDPA cannot do
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            s = torch.tanh((q @ k.transpose(-1, -2)) * (scale / softcap)) * softcap
            out = s.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(b * t, out.shape[1], out.shape[3])


def layer_weights(config: GemmaConfig, layer: int, tensors: dict[str, torch.Tensor],
                  linears: dict[str, torch.Tensor]) -> tuple[LayerWeights, NormScales]:
    """A layer for ``model.decoder_layer`` from its norm tensors (canonical names) and dense
    linears (by short name), fp32, unfused."""
    p = f"layers.{layer}."

    def norm(name: str) -> torch.Tensor | None:
        t = tensors.get(p + name)
        return None if t is None else t.float()

    w = LayerWeights(
        input_norm=norm("input_layernorm.weight"),
        qkv=(linears["q_proj"], linears["k_proj"], linears["v_proj"]),
        o=linears["o_proj"],
        q_norm=norm("self_attn.q_norm.weight"),
        k_norm=norm("self_attn.k_norm.weight"),
        post_attn_norm=norm("post_attention_layernorm.weight"),
        pre_ff_norm=norm("pre_feedforward_layernorm.weight"),
        post_ff_norm=norm("post_feedforward_layernorm.weight"),
        gate_up=(linears["gate_proj"], linears["up_proj"]),
        down=linears["down_proj"],
    )
    return w, NormScales.of(w, config)


def run_layer(config: GemmaConfig, layer: int, w: LayerWeights, ns: NormScales,
              x: torch.Tensor) -> torch.Tensor:  # [windows, length, hidden] -> same
    """``model.decoder_layer`` on equal-length windows, each starting at position 0."""
    b, t, hidden = x.shape
    positions = torch.arange(t, device=x.device).repeat(b)
    inv_freq = reference.rope_inv_freq(config.head_dim, *config.layer_rope(layer), x.device)
    rope = ops.RotaryPositions(positions, inv_freq, x.dtype)
    out = decoder_layer(config, layer, w, ns, x.reshape(b * t, hidden), rope,
                        WindowAttention(b, t))
    return out.view(b, t, hidden)


class Factors:
    """The trainable log-factors of one layer's INT4 weights and the dense weights they give."""

    def __init__(self, weights: dict[str, Int4Weight]):
        self.weights = weights
        self.grid = {}  # name -> (q - zero) int8 [out, in]: fixed (int8: a quarter of fp32)
        self.log_scale = {}  # name -> [out, G]
        self.log_pre = {}  # shared-input group -> [in]
        for name, w in weights.items():
            zero = (w.zeros.float().repeat_interleave(w.group_size, dim=1)[:, :w.in_features]
                    if w.zeros is not None else float(SYMMETRIC_ZERO))
            self.grid[name] = (unpack_int4(w.qweight).float() - zero).to(torch.int8)
            self.log_scale[name] = torch.zeros_like(w.scales, dtype=torch.float32,
                                                    requires_grad=True)
            if w.pre_quant_scale is not None:
                self.log_pre.setdefault(_SHARED_INPUT[name], torch.zeros(
                    w.in_features, device=w.scales.device, requires_grad=True))

    def parameters(self) -> list[torch.Tensor]:
        return [*self.log_scale.values(), *self.log_pre.values()]

    def _stored(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scales, pre_quant_scale) with the factors applied, rounded to the storage dtypes
        (straight-through: the forward sees the stored values, the gradient passes unrounded)."""
        w = self.weights[name]
        scales = w.scales.float() * self.log_scale[name].exp()
        scales = scales + (scales.to(w.scales.dtype).float() - scales).detach()
        pre = None
        if w.pre_quant_scale is not None:
            pre = w.pre_quant_scale.float() * self.log_pre[_SHARED_INPUT[name]].exp()
            pre = pre + (pre.to(w.pre_quant_scale.dtype).float() - pre).detach()
        return scales, pre

    def dense(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, w in self.weights.items():
            scales, pre = self._stored(name)
            dense = self.grid[name].float() * scales.repeat_interleave(w.group_size, dim=1)[
                :, :w.in_features]
            out[name] = dense if pre is None else dense * pre[None, :]
        return out

    def export(self) -> dict[str, Int4Weight]:
        out = {}
        with torch.no_grad():
            for name, w in self.weights.items():
                scales, pre = self._stored(name)
                out[name] = dataclasses.replace(
                    w, scales=scales.to(w.scales.dtype),
                    pre_quant_scale=None if pre is None else pre.to(w.pre_quant_scale.dtype))
        return out


def _mse(y: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    err = (y - target).pow(2).mean(dim=-1)  # [windows, length]
    return (err * valid).sum() / valid.sum()


def fit_keeping_best(params: list[torch.Tensor],
                     batch_loss: Callable[[torch.Tensor], torch.Tensor],
                     full_loss: Callable[[], float], *, num_windows: int,
                     device: torch.device, options) -> tuple[float, float]:
    """Adam on random mini-batches of windows, learning rate decaying linearly to 0; every
    ``eval_every`` steps (and at the end) the loss on all windows is checked and the best
    parameters so far, the starting point included, are kept. Leaves ``params`` at the best
    point; returns (loss at the start, loss at the best point). ``options``: ``steps``, ``lr``,
    ``batch_windows``, ``eval_every``, ``seed`` (RefineOptions or DistillOptions)."""
    before = best = full_loss()
    best_state = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=options.lr)
    gen = torch.Generator().manual_seed(options.seed)
    for step in range(options.steps):
        for group in opt.param_groups:
            group["lr"] = options.lr * (1 - step / options.steps)
        idx = torch.randperm(num_windows, generator=gen)[:options.batch_windows].to(device)
        opt.zero_grad(set_to_none=True)
        batch_loss(idx).backward()
        opt.step()
        if (step + 1) % options.eval_every == 0 or step + 1 == options.steps:
            loss = full_loss()
            if loss < best:
                best, best_state = loss, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, best_state, strict=True):
            p.copy_(b)
    return before, best


def refine_layer(
    config: GemmaConfig,
    layer: int,
    norms: dict[str, torch.Tensor],  # the layer's norm tensors, canonical names
    weights: dict[str, Int4Weight],  # the layer's 7 linears by short name (LINEARS)
    inputs: torch.Tensor,  # [windows, length, hidden] the quantized model's input to the layer
    target: torch.Tensor,  # [windows, length, hidden] the float model's output of the layer
    valid: torch.Tensor,  # [windows, length] bool: real tokens (windows padded at the end)
    options: RefineOptions = RefineOptions(),
) -> RefineResult:
    """Refined scales for one layer's INT4 weights (see the module docstring)."""
    if set(weights) != set(LINEARS):
        raise ValueError(f"refine_layer: need the linears {LINEARS}, got {sorted(weights)}")
    if inputs.shape != target.shape or inputs.shape[:2] != valid.shape:
        raise ValueError(f"refine_layer: inputs {list(inputs.shape)}, target "
                         f"{list(target.shape)} and valid {list(valid.shape)} do not match")
    factors = Factors(weights)
    inputs, target, valid = inputs.float(), target.float(), valid.float()

    def loss_on(idx: torch.Tensor | None) -> torch.Tensor:
        w, ns = layer_weights(config, layer, norms, factors.dense())
        x, t, v = (inputs, target, valid) if idx is None else (inputs[idx], target[idx], valid[idx])
        return _mse(run_layer(config, layer, w, ns, x), t, v)

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_on(None))

    before, best = fit_keeping_best(factors.parameters(), loss_on, full_loss,
                                    num_windows=inputs.shape[0], device=inputs.device,
                                    options=options)
    return RefineResult(factors.export(), before, best)


class LayerwiseRefiner:
    """Carries the calibration windows' hidden states up the model, float and quantized side by
    side, refining each layer's INT4 scales on the way (``quantize_tensors`` drives it)."""

    def __init__(self, config: GemmaConfig, embed: torch.Tensor, windows: list[list[int]],
                 options: RefineOptions = RefineOptions(), device: str | torch.device = "cpu"):
        if not windows or not all(windows):
            raise ValueError("LayerwiseRefiner: no calibration windows")
        self.config, self.options = config, options
        length = max(len(w) for w in windows)
        # Windows are padded at the end: causal attention keeps pads out of the real tokens, and
        # the loss masks them.
        ids = torch.zeros(len(windows), length, dtype=torch.long)
        self.valid = torch.zeros(len(windows), length, dtype=torch.bool)
        for i, w in enumerate(windows):
            ids[i, :len(w)] = torch.tensor(w)
            self.valid[i, :len(w)] = True
        ids, self.valid = ids.to(device), self.valid.to(device)
        with torch.no_grad():
            x = embed.to(device)[ids].float() * config.hidden_size ** 0.5
        self.embedded = x  # the windows' scaled embeddings (distill.py starts from them)
        self.float_hidden, self.quant_hidden = x, x.clone()

    @torch.no_grad()
    def _advance(self, layer: int, norms: dict[str, torch.Tensor],
                 linears: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        w, ns = layer_weights(self.config, layer, norms, linears)
        return run_layer(self.config, layer, w, ns, x)

    def refine(self, layer: int, norms: dict[str, torch.Tensor],
               dense: dict[str, torch.Tensor],  # the float linears by short name
               quantized: dict[str, Int4Weight]) -> RefineResult:
        device = self.float_hidden.device
        norms = {n: t.to(device).float() for n, t in norms.items()}
        target = self._advance(layer, norms, {n: t.to(device).float() for n, t in dense.items()},
                               self.float_hidden)
        result = refine_layer(self.config, layer, norms,
                              {n: q.to(device) for n, q in quantized.items()},
                              self.quant_hidden, target, self.valid, self.options)
        self.quant_hidden = self._advance(
            layer, norms, {n: q.dequantize(torch.float32) for n, q in result.weights.items()},
            self.quant_hidden)
        self.float_hidden = target
        return result
