"""Attention kernel benchmark at Gemma shapes: prefill, paged decode and KV-cache write.

On CUDA: times the Triton kernels (CUDA events, warmup, median) beside
``torch.nn.functional.scaled_dot_product_attention`` on the same inputs (dense, unpaged; it has no
soft-cap, so it does slightly less work on gemma-2-9b), and reports TFLOP/s, GB/s and the fraction
of the device roofline (time the binding roofline allows / measured time).
On CPU: times the PyTorch references at small shapes only: those are NOT kernel figures.

    python benchmarks/kernels.py --out benchmarks/results/kernels.json
    python benchmarks/kernels.py --models gemma-2-9b --batches 1,64 --contexts 8192 --kernels decode

Peaks come from the device name (trt_gemma/bench/peaks.py) or --peak-tbs / --peak-tflops
(env TRT_GEMMA_PEAK_TBS / TRT_GEMMA_PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from trt_gemma.bench.peaks import peak_tbs, peak_tflops
from trt_gemma.kernels import reference as ref

# name: (num_heads, num_kv_heads, head_dim, sliding_window, softcap); gemma-2-9b's local layers.
MODELS = {
    "gemma-2b": (8, 1, 256, None, None),
    "gemma-7b": (16, 16, 256, None, None),
    "gemma-2-9b": (16, 8, 256, 4096, 50.0),
}
def device_peaks(name: str, tbs: float | None, tflops: float | None) -> dict:
    """The device's peaks (trt_gemma.bench.peaks' table, the environment overrides), unless given
    on the command line."""
    return {"tbs": tbs or peak_tbs(name), "tflops": tflops or peak_tflops(name)}


def time_ms(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median milliseconds of fn() over iters runs after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sdpa(q, k, v, *, causal: bool, window: int | None, scale: float):
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D]; GQA by enable_gqa (torch >= 2.5) or repeat."""
    lq, lk = q.shape[2], k.shape[2]
    mask = None
    if window is not None and lq > 1:  # dense boolean window mask (SDPA has no window option)
        qp = torch.arange(lk - lq, lk, device=q.device)[:, None]
        kp = torch.arange(lk, device=q.device)[None, :]
        mask, causal = (kp <= qp) & (kp > qp - window), False
    try:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and lq > 1, scale=scale, enable_gqa=True
        )
    except TypeError:  # older torch: no enable_gqa
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and lq > 1, scale=scale
        )


def _record(kernel, model, batch, ctx, ms, flops, nbytes, peaks, sdpa_ms=None) -> dict:
    rec = {"kernel": kernel, "model": model, "batch": batch, "context": ctx, "ms": ms}
    rec["tflops"] = flops / ms / 1e9
    rec["gbs"] = nbytes / ms / 1e6
    if peaks["tbs"] and peaks["tflops"]:
        bound_ms = max(nbytes / (peaks["tbs"] * 1e9), flops / (peaks["tflops"] * 1e9))
        rec["roofline_fraction"] = bound_ms / ms
    if sdpa_ms is not None:
        rec.update(sdpa_ms=sdpa_ms, sdpa_tflops=flops / sdpa_ms / 1e9, speedup=sdpa_ms / ms)
    return rec


def bench_decode(model, batch, ctx, args, kern, peaks, dev, dtype) -> dict:
    h, hkv, d, window, softcap = MODELS[model]
    bs = args.block_size
    nblk = -(-ctx // bs)
    k_cache = torch.randn(batch * nblk, bs, hkv, d, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * nblk, device=dev).view(batch, nblk).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(batch, h, d, device=dev, dtype=dtype)
    kw = dict(scale=d**-0.5, sliding_window=window, softcap=softcap)
    fn = kern.paged_decode_attention if kern else ref.paged_decode_attention_ref
    ms = time_ms(
        lambda: fn(q, k_cache, v_cache, tables, lens, **kw), args.warmup, args.iters, args.cuda
    )
    seen = min(ctx, window or ctx)  # keys one query reads
    el = k_cache.element_size()
    flops = 4 * batch * h * seen * d
    nbytes = 2 * batch * hkv * seen * d * el + 2 * q.numel() * el
    # Dense, contiguous K/V of the visible keys only: SDPA's best case, no paging.
    kd = torch.randn(batch, hkv, seen, d, device=dev, dtype=dtype)
    vd = torch.randn_like(kd)
    q4 = q.unsqueeze(2)
    sdpa_fn = lambda: sdpa(q4, kd, vd, causal=False, window=None, scale=d**-0.5)  # noqa: E731
    sdpa_ms = time_ms(sdpa_fn, args.warmup, args.iters, args.cuda)
    return _record("paged_decode", model, batch, ctx, ms, flops, nbytes, peaks, sdpa_ms)


def bench_prefill(model, batch, ctx, args, kern, peaks, dev, dtype) -> dict:
    h, hkv, d, window, softcap = MODELS[model]
    q = torch.randn(batch * ctx, h, d, device=dev, dtype=dtype)
    k = torch.randn(batch * ctx, hkv, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    cu = torch.arange(0, (batch + 1) * ctx, ctx, dtype=torch.int32, device=dev)
    kw = dict(scale=d**-0.5, sliding_window=window, softcap=softcap)
    fn = kern.prefill_attention if kern else ref.prefill_attention_ref
    ms = time_ms(lambda: fn(q, k, v, cu, cu, **kw), args.warmup, args.iters, args.cuda)
    w = window or ctx
    pairs = sum(min(i + 1, w) for i in range(ctx))  # visible (query, key) pairs per sequence
    flops = 4 * batch * h * pairs * d
    nbytes = (2 * q.numel() + 2 * k.numel()) * q.element_size()  # q, o, k, v once each
    q4 = q.view(batch, ctx, h, d).transpose(1, 2)
    k4, v4 = (x.view(batch, ctx, hkv, d).transpose(1, 2) for x in (k, v))
    sdpa_fn = lambda: sdpa(q4, k4, v4, causal=True, window=window, scale=d**-0.5)  # noqa: E731
    sdpa_ms = time_ms(sdpa_fn, args.warmup, args.iters, args.cuda)
    return _record("prefill", model, batch, ctx, ms, flops, nbytes, peaks, sdpa_ms)


def bench_write(model, batch, ctx, args, kern, peaks, dev, dtype) -> dict:
    _, hkv, d, _, _ = MODELS[model]
    tokens, bs = batch * ctx, args.block_size
    nblk = -(-tokens // bs)
    k_cache = torch.empty(nblk, bs, hkv, d, device=dev, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    k = torch.randn(tokens, hkv, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(nblk * bs, device=dev)[:tokens]
    fn = kern.write_kv_cache if kern else ref.write_kv_cache_ref
    ms = time_ms(lambda: fn(k, v, k_cache, v_cache, slots), args.warmup, args.iters, args.cuda)
    nbytes = 4 * k.numel() * k.element_size()  # read k, v; write both
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)

    def index_put():  # the plain-PyTorch scatter, as the baseline
        flat_k[slots] = k
        flat_v[slots] = v

    base_ms = time_ms(index_put, args.warmup, args.iters, args.cuda)
    return _record("write_kv_cache", model, batch, ctx, ms, 0, nbytes, peaks, base_ms)


BENCHES = {"prefill": bench_prefill, "decode": bench_decode, "write": bench_write}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument(
        "--kernels", default=",".join(BENCHES), help="comma list of " + ", ".join(BENCHES)
    )
    p.add_argument("--batches", type=_ints, default=None, help="default 1,8,64 (CPU: 1,2)")
    p.add_argument(
        "--contexts", type=_ints, default=None, help="default 512,2048,8192 (CPU: 128,512)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=65536, help="skip prefill/write above batch*ctx"
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=None, help="default 5 (CPU: 1)")
    p.add_argument("--iters", type=int, default=None, help="default 20 (CPU: 3)")
    p.add_argument("--peak-tbs", type=float, default=None, help="HBM bandwidth, TB/s")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 TFLOP/s")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    cuda = args.cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if cuda:
        from trt_gemma.kernels import attention as kern

        name = torch.cuda.get_device_name()
        dtype = torch.bfloat16
    else:
        kern, name, dtype = None, "cpu", torch.float32
        print("No CUDA device: timing the PyTorch REFERENCES on CPU at small shapes (fp32).")
        print("These are not Triton kernel figures.\n")
    args.batches = args.batches or ([1, 8, 64] if cuda else [1, 2])
    args.contexts = args.contexts or ([512, 2048, 8192] if cuda else [128, 512])
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.iters = args.iters or (20 if cuda else 3)
    peaks = device_peaks(name, args.peak_tbs, args.peak_tflops)
    print(f"device: {name}  peaks: {peaks['tbs']} TB/s, {peaks['tflops']} TFLOP/s")
    print(f"{'kernel':15} {'model':11} {'batch':>5} {'ctx':>6} {'ms':>9} {'TFLOP/s':>8} "
          f"{'GB/s':>8} {'roof%':>6} {'base ms':>9} {'speedup':>7}")  # fmt: skip

    results = []
    torch.manual_seed(0)
    for kernel in args.kernels.split(","):
        for model in args.models.split(","):
            for batch in args.batches:
                for ctx in args.contexts:
                    if kernel != "decode" and batch * ctx > args.max_tokens:
                        continue
                    rec = BENCHES[kernel](model, batch, ctx, args, kern, peaks, dev, dtype)
                    results.append(rec)
                    roof = rec.get("roofline_fraction")
                    print(f"{rec['kernel']:15} {model:11} {batch:5} {ctx:6} {rec['ms']:9.3f} "
                          f"{rec['tflops']:8.2f} {rec['gbs']:8.1f} "
                          f"{'-' if roof is None else f'{100 * roof:.0f}':>6} "
                          f"{rec['sdpa_ms']:9.3f} {rec['speedup']:7.2f}")  # fmt: skip
                    if cuda:
                        torch.cuda.empty_cache()
    if args.out:
        report = {
            "device": name,
            "mode": "triton" if cuda else "cpu-reference (not kernel figures)",
            "dtype": str(dtype).removeprefix("torch."),
            "peaks": peaks,
            "baseline": "scaled_dot_product_attention (dense) / index_put for write_kv_cache",
            "torch": torch.__version__,
            "results": results,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
