"""Per-step host time of the runtime: building a decode step's inputs, the model forward excluded.

Times ``ModelRunner.prepare`` (which includes the one host-to-device copy on CUDA) against real
``Sequence`` objects in the decode state, at several batch sizes, on a tiny random Gemma 3 config
with Gemma 3's two KV groups (full attention and a 512-token sliding window). Each timed step is a
real step of the bookkeeping: every sequence appends a token, the block manager allocates (a new
block every ``block_size`` steps, blocks dropped out of the window), the inputs are prepared, the
tokens are committed. "before" is the input builder as it was before the persistent step buffers
(copied below as ``legacy_prepare`` with the torch ``cpu_decode_keys`` of that time: Python lists,
one ``torch.tensor`` per input), run on the same states, so both columns come from one process.

    python benchmarks/host_step.py --out benchmarks/results/host_step-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import trt_gemma  # noqa: F401  (first: sets the OpenMP spin policy before torch loads)
import torch  # noqa: E402

from trt_gemma.config import FULL, SLIDING, GemmaConfig
from trt_gemma.model import GemmaModel
from trt_gemma.runtime.block_manager import BlockManager, plan_groups
from trt_gemma.runtime.model_runner import Batch, ModelRunner
from trt_gemma.runtime.paged_attention import AttentionMetadata, GroupMetadata
from trt_gemma.runtime.scheduler import SchedulerOutput
from trt_gemma.runtime.sequence import Sequence
from trt_gemma.sampling_params import SamplingParams


def tiny_gemma3(window: int, max_len: int, device: torch.device) -> GemmaModel:
    """Two layers (one sliding, one full): Gemma 3's two KV groups at a negligible weight size."""
    cfg = GemmaConfig(architecture="gemma3", vocab_size=512, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=max_len,
                      sliding_window=window, layer_types=(SLIDING, FULL), use_qk_norm=True,
                      use_post_norms=True, query_pre_attn_scalar=32)
    g = torch.Generator().manual_seed(0)
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "pre_feedforward_layernorm.weight": (h,),
            p + "post_feedforward_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, h),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    weights = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    return GemmaModel.from_state_dict(cfg, weights, device=device)


def legacy_prepare(runner: ModelRunner, out: SchedulerOutput) -> Batch:
    """The input builder before the persistent step buffers (ModelRunner.prepare as it was)."""
    bs = runner.block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[list[int]] = [[] for _ in runner.windows]
    logits_indices: list[int] = []
    sample_seqs: list[Sequence] = []
    cu_q = [0]
    direct = not runner.fp8_kv
    key_slots: list[list[int]] = [[] for _ in runner.windows]
    cu_k: list[list[int]] = [[0] for _ in runner.windows]
    for idx, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens, strict=True)):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        for g, table in enumerate(seq.block_tables):
            slots[g].extend(table[p // bs] * bs + p % bs for p in range(start, end))
        if end == seq.num_tokens:
            logits_indices.append(len(input_ids) - 1)
            sample_seqs.append(seq)
        if idx >= out.num_decodes:
            cu_q.append(cu_q[-1] + n)
            direct = direct and start == 0
            for g, (table, window) in enumerate(zip(seq.block_tables, runner.windows,
                                                    strict=True)):
                first = 0 if window is None else max(0, start - window + 1)
                key_slots[g].extend(table[p // bs] * bs + p % bs for p in range(first, end))
                cu_k[g].append(cu_k[g][-1] + end - first)
    d = out.num_decodes
    decode_seqs = out.seqs[:d]
    dev = runner.device
    groups = []
    context_lens = _tensor([s.num_computed_tokens + 1 for s in decode_seqs], torch.int32, dev)
    for g in range(len(runner.windows)):
        tables = [seq.block_tables[g] for seq in decode_seqs]
        width = max((len(t) for t in tables), default=0)
        rows = [[max(b, 0) for b in t] + [0] * (width - len(t)) for t in tables]
        gm = GroupMetadata(
            slot_mapping=_tensor(slots[g], torch.int64, dev),
            block_tables=_tensor(rows, torch.int32, dev).view(d, width),
            context_lens=context_lens,
            prefill_key_slots=None if direct else _tensor(key_slots[g], torch.int64, dev),
            cu_seqlens_k=None if direct else _tensor(cu_k[g], torch.int32, dev),
        )
        if runner.cpu_fast_path:
            gm.decode_key_slots, gm.decode_key_mask = legacy_cpu_decode_keys(
                gm.block_tables, context_lens, bs, runner.windows[g])
        groups.append(gm)
    meta = AttentionMetadata(d, _tensor(cu_q, torch.int32, dev), groups)
    return Batch(_tensor(input_ids, torch.int64, dev), _tensor(positions, torch.int64, dev),
                 meta, _tensor(logits_indices, torch.int64, dev), sample_seqs)


def legacy_cpu_decode_keys(block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, sliding_window: int | None):
    """paged_attention.cpu_decode_keys before it moved to numpy."""
    lens = context_lens.long()
    start = (lens - sliding_window).clamp(min=0) if sliding_window else torch.zeros_like(lens)
    width = int((lens - start).max()) if lens.numel() else 0
    pos = start[:, None] + torch.arange(width)[None, :]  # [D, width]
    mask = pos < lens[:, None]
    pos = torch.where(mask, pos, 0)
    blocks = torch.gather(block_tables.long(), 1, pos // block_size)
    return blocks * block_size + pos % block_size, mask


def _tensor(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(data, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def decoding(bm: BlockManager, batch: int, context: int) -> list[Sequence]:
    """`batch` sequences whose first `context` tokens are in the cache, one token to decode."""
    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    seqs = []
    for i in range(batch):
        prompt = [(7 * i + j) % 500 + 3 for j in range(context + 1)]
        seq = Sequence(i, str(i), 0, prompt, params, i, len(bm.groups))
        bm.allocate(seq, context)
        seq.num_computed_tokens = context
        bm.commit(seq)
        seqs.append(seq)
    return seqs


def measure(prepare, runner: ModelRunner, batch: int, context: int, steps: int,
            sync) -> list[float]:
    """Seconds of each step's `prepare` (+ the wait for its copies) over `steps` decode steps."""
    bm = runner.block_manager
    seqs = decoding(bm, batch, context)
    times = []
    for step in range(steps):
        for seq in seqs:
            bm.allocate(seq, 1)
        out = SchedulerOutput(list(seqs), [1] * batch, batch)
        t0 = time.perf_counter()
        prepare(runner, out)
        sync()
        times.append(time.perf_counter() - t0)
        for seq in seqs:
            seq.num_computed_tokens += 1
            bm.commit(seq)
            seq.token_ids.append(3 + step % 100)
    for seq in seqs:
        bm.free(seq)
    return times


def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["model"] = value.strip()
        elif key.strip() == "flags":
            present = set(value.split())
            wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
            info["flags"] = [f for f in wanted if f in present]
            break
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/host_step-cpu.json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = tiny_gemma3(args.window, args.max_model_len, dev)
    need = max(batches) * (-(-(args.context + args.steps + 1) // args.block_size) + 1)
    per_layer = 2 * args.block_size * model.config.kv_size * 4
    groups = plan_groups(model.config, per_layer, 0, args.block_size, max(batches),
                         max(batches), num_full_blocks=need)
    bm = BlockManager(groups, args.block_size, enable_prefix_caching=False)
    runner = ModelRunner(model, bm, torch.float32, max_model_len=args.max_model_len)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    fast_path = runner.cpu_fast_path
    for batch in batches:
        row = {"batch": batch, "context": args.context}
        # Interleaved rounds, best median: other processes on a shared CPU only ever add time.
        # "*_no_cpu_keys": without the CPU fast path's per-decode key slots (cpu_decode_keys),
        # i.e. the inputs a CUDA step builds (there the one copy is timed too).
        modes = [("before", legacy_prepare, fast_path), ("after", ModelRunner.prepare, fast_path)]
        if fast_path:
            modes += [("before_no_cpu_keys", legacy_prepare, False),
                      ("after_no_cpu_keys", ModelRunner.prepare, False)]
        best = {name: float("inf") for name, _, _ in modes}
        for _ in range(args.rounds):
            for name, prepare, fast in modes:
                runner.cpu_fast_path = fast
                measure(prepare, runner, batch, args.context, 2, sync)  # warm-up
                t = measure(prepare, runner, batch, args.context, args.steps, sync)
                best[name] = min(best[name], statistics.median(t))
        runner.cpu_fast_path = fast_path
        row.update({f"{k}_ms": round(1e3 * v, 3) for k, v in best.items()})
        row["speedup"] = round(row["before_ms"] / row["after_ms"], 2)
        rows.append(row)
        print(f"batch {batch:4d}  context {args.context}:  " + "  ".join(
            f"{k} {v * 1e3:.3f} ms" for k, v in best.items()) + f"  ({row['speedup']}x)",
            flush=True)
    report = {
        "what": "median host time of ModelRunner.prepare per decode step (forward excluded)",
        "date": datetime.date.today().isoformat(),
        "device": str(dev),
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "block_size": args.block_size, "sliding_window": args.window,
        "kv_groups": len(groups), "steps": args.steps, "rounds": args.rounds,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
