"""Persistent step inputs (runtime/step_inputs.py) against a full rebuild from the sequences.

Every step of real engine schedules (preemption and resume, forks with copy-on-write, prefix-cache
hits, aborts, sliding-window groups dropping blocks) is checked against the inputs rebuilt from
scratch in plain Python, as the runner built them before it kept buffers across steps. The CUDA
graph layout (padding rows, shrinking batches) is checked on CPU by running the padded forward
eagerly in place of the replay.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_gemma.config import FULL, SLIDING, GemmaConfig
from trt_gemma.model import GemmaModel
from trt_gemma.runtime import EngineConfig, LLMEngine
from trt_gemma.runtime.cuda_graph import CudaGraphRunner
from trt_gemma.runtime.paged_attention import cpu_decode_keys
from trt_gemma.runtime.sequence import Sequence
from trt_gemma.runtime.step_inputs import BlockTableRows, StepBuffer, reserve_step
from trt_gemma.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

BS = 4  # small blocks: appends, copy-on-write and window drops every few steps
WINDOW = 6


@pytest.fixture(scope="module")
def model():
    """A random two-group Gemma 3 (sliding, full, sliding): numerics are not under test here."""
    cfg = GemmaConfig(architecture="gemma3", vocab_size=128, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                      sliding_window=WINDOW, layer_types=(SLIDING, FULL, SLIDING),
                      use_qk_norm=True, use_post_norms=True, query_pre_attn_scalar=16)
    g = torch.Generator().manual_seed(0)
    h, hd = cfg.hidden_size, cfg.head_dim
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
        shapes.update({p + "self_attn.q_proj.weight": (2 * hd, h),
                       p + "self_attn.k_proj.weight": (hd, h),
                       p + "self_attn.v_proj.weight": (hd, h),
                       p + "self_attn.o_proj.weight": (h, 2 * hd),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate_proj.weight": (64, h), p + "mlp.up_proj.weight": (64, h),
                       p + "mlp.down_proj.weight": (h, 64)})
    return GemmaModel.from_state_dict(
        cfg, {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()})


def reference_inputs(runner, out) -> dict:
    """The step's inputs rebuilt from the sequences in plain Python (the pre-buffer builder)."""
    bs, d = runner.block_size, out.num_decodes
    ref = {"input_ids": [], "positions": [], "logits_indices": [], "cu_q": [0],
           "slots": [[] for _ in runner.windows], "keys": [[] for _ in runner.windows],
           "cu_k": [[0] for _ in runner.windows]}
    direct = not runner.fp8_kv
    for idx, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens, strict=True)):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        ref["input_ids"] += seq.token_ids[start:end]
        ref["positions"] += range(start, end)
        for g, table in enumerate(seq.block_tables):
            ref["slots"][g] += [table[p // bs] * bs + p % bs for p in range(start, end)]
        if end == seq.num_tokens:
            ref["logits_indices"].append(len(ref["input_ids"]) - 1)
        if idx >= d:
            ref["cu_q"].append(ref["cu_q"][-1] + n)
            direct = direct and start == 0
            for g, (table, window) in enumerate(zip(seq.block_tables, runner.windows,
                                                    strict=True)):
                first = 0 if window is None else max(0, start - window + 1)
                ref["keys"][g] += [table[p // bs] * bs + p % bs for p in range(first, end)]
                ref["cu_k"][g].append(ref["cu_k"][g][-1] + end - first)
    ref["direct"] = direct
    ref["context_lens"] = [s.num_computed_tokens + 1 for s in out.seqs[:d]]
    ref["tables"] = []
    for g in range(len(runner.windows)):
        tables = [s.block_tables[g] for s in out.seqs[:d]]
        width = max((len(t) for t in tables), default=0)
        ref["tables"].append([[max(b, 0) for b in t] + [0] * (width - len(t)) for t in tables])
    return ref


def check_batch(runner, batch, ref) -> None:
    d = batch.meta.num_decodes
    rows = len(ref["input_ids"])
    assert batch.input_ids.tolist() == ref["input_ids"]
    assert batch.positions.tolist() == ref["positions"]
    assert batch.logits_indices.tolist() == ref["logits_indices"]
    assert batch.input_ids.dtype == batch.positions.dtype == torch.int64
    if not batch.graph_size:
        assert batch.meta.cu_seqlens_q.tolist() == ref["cu_q"]
    for g, gm in enumerate(batch.meta.groups):
        assert gm.slot_mapping.dtype == torch.int64 and gm.block_tables.dtype == torch.int32
        assert gm.context_lens.dtype == torch.int32
        assert gm.slot_mapping[:rows].tolist() == ref["slots"][g]
        assert gm.context_lens[:d].tolist() == ref["context_lens"]
        width = len(ref["tables"][g][0]) if d else 0
        assert gm.block_tables[:d, :width].tolist() == ref["tables"][g]
        if batch.graph_size:  # the graph's padded inputs: padding rows write nowhere, see nothing
            f = runner.graphs.fields(batch.graph_size)  # its layout, as prepare filled it
            assert f.slot_mapping[g][1].shape[0] == batch.graph_size
            assert f.slot_mapping[g][1][:d].tolist() == ref["slots"][g]
            assert (f.slot_mapping[g][1][d:] == -1).all() and (f.context_lens[1][d:] == 0).all()
            assert f.input_ids[1][:d].tolist() == ref["input_ids"]
            continue
        assert gm.block_tables.shape == (d, width)
        if ref["direct"]:
            assert gm.prefill_key_slots is None and gm.cu_seqlens_k is None
        else:
            assert gm.prefill_key_slots.tolist() == ref["keys"][g]
            assert gm.cu_seqlens_k.tolist() == ref["cu_k"][g]
        if runner.cpu_fast_path:
            tables = torch.tensor(ref["tables"][g], dtype=torch.int32).view(d, width)
            lens = torch.tensor(ref["context_lens"], dtype=torch.int32)
            slots, mask = cpu_decode_keys(tables, lens, runner.block_size, runner.windows[g])
            assert torch.equal(gm.decode_key_slots, slots)
            assert torch.equal(gm.decode_key_mask, mask)


def checked_engine(model, **config) -> LLMEngine:
    """An engine whose every prepared batch is compared with the full rebuild."""
    config = {"kv_cache_memory": 4 << 20, "block_size": BS, **config}
    engine = LLMEngine(model, None, EngineConfig(**config))
    runner, prepare = engine.runner, engine.runner.prepare

    def prepare_checked(out):
        ref = reference_inputs(runner, out)  # before: prepare may reuse last step's memory
        batch = prepare(out)
        check_batch(runner, batch, ref)
        engine.num_checked_steps += 1
        engine.num_checked_decodes += batch.meta.num_decodes
        return batch

    runner.prepare = prepare_checked
    engine.num_checked_steps = engine.num_checked_decodes = 0
    return engine


def run(engine, schedule, aborts=None, limit=500) -> dict:
    """Step until done, adding {step: [(id, prompt, params)]} and aborting {step: [ids]}."""
    schedule, aborts, outs, step = dict(schedule), dict(aborts or {}), {}, 0
    while engine.has_unfinished_requests() or schedule:
        for rid, prompt, params in schedule.pop(step, []):
            engine.add_request(rid, prompt, params)
        for rid in aborts.pop(step, []):
            engine.abort(rid)
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = [o.token_ids for o in out.outputs]
        step += 1
        assert step < limit
    assert engine.block_manager.all_free()
    return outs


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_preemption_and_resume(model):
    ps = prompts([9, 14, 5, 11, 7], seed=1)
    # A pool far too small for five ~30-token sequences: the newest are preempted and resumed,
    # partly from the prefix cache.
    engine = checked_engine(model, num_kv_blocks=18, max_num_batched_tokens=12, max_num_seqs=4)
    run(engine, {0: [(str(i), p, greedy(22)) for i, p in enumerate(ps[:4])],
                 3: [("4", ps[4], greedy(15))]})
    assert engine.get_stats().num_preemptions > 0
    assert engine.num_checked_decodes > 50


def test_forks_copy_on_write_and_aborts(model):
    ps = prompts([6, 10, 13], seed=2)
    sample = SamplingParams(n=3, max_tokens=14, temperature=1.0, seed=5, ignore_eos=True)
    engine = checked_engine(model, max_num_seqs=8)
    copies = []
    real_copy = engine.runner.kv_cache.copy_blocks
    engine.runner.kv_cache.copy_blocks = lambda c: (copies.extend(c), real_copy(c))
    outs = run(engine, {0: [("a", ps[0], sample), ("b", ps[1], greedy(20))],
                        2: [("c", ps[2], SamplingParams(n=2, max_tokens=30, temperature=0.7,
                                                        ignore_eos=True))]},
               aborts={9: ["c"], 12: ["b"]})
    assert copies, "forks never copied a block on write"
    assert len(outs["a"]) == 3 and "b" not in outs and "c" not in outs


def test_prefix_cache_hits_and_window_drops(model):
    base = prompts([23], seed=3)[0]
    later = [base + [5, 6, 7], base[:17] + [9], base]
    engine = checked_engine(model, max_num_batched_tokens=16, max_num_seqs=8)
    run(engine, {0: [("0", base, greedy(12))],
                 4: [(f"p{i}", p, greedy(10)) for i, p in enumerate(later)]})
    assert engine.block_manager.prefix_hit_tokens > 0
    assert engine.num_checked_steps > 10


def test_graph_layout_on_cpu_matches_eager(model):
    """The CUDA-graph input path, replayed eagerly on CPU: same tokens as the plain engine."""
    ps = prompts([5, 9, 12, 7, 3, 10], seed=4)
    sched = {0: [(str(i), p, greedy(8 + 3 * i)) for i, p in enumerate(ps[:4])],
             6: [(str(i), p, greedy(9)) for i, p in enumerate(ps[4:], 4)]}
    expected = run(LLMEngine(model, None, EngineConfig(kv_cache_memory=4 << 20, block_size=BS)),
                   sched)
    engine = checked_engine(model)
    runner = engine.runner
    graphs = CudaGraphRunner(model, runner.kv_cache, len(runner.windows), (1, 2, 4, 8),
                             runner.rows.max_blocks)
    graph_steps = []

    def replay_eagerly(batch):  # what the captured graph computes: the padded forward
        graph_steps.append((batch.graph_size, batch.meta.num_decodes))
        f = graphs.fields(batch.graph_size)  # the same offsets, the inputs prepare wrote
        return graphs._forward(batch.graph_size, f)[:batch.meta.num_decodes]

    graphs.run = replay_eagerly
    runner.graphs = graphs
    assert run(engine, sched) == expected
    sizes = {s for s, _ in graph_steps}
    assert len(sizes) >= 3 and any(n < s for s, n in graph_steps)


def test_block_table_rows_reuse_and_copy_on_write():
    rows = BlockTableRows(num_groups=2, max_blocks=6, rows=1)
    params = SamplingParams()
    a, b = (Sequence(i, str(i), 0, [1], params, i, 2) for i in range(2))
    a.block_tables = [[3, 4, 5], [-1, 7, 8]]
    a.num_dropped_blocks = [0, 1]
    b.block_tables = [[9], [10]]
    assert rows.update([a, b]).tolist() == [0, 1]  # grown past its first row
    assert rows.tables[0][0].tolist() == [3, 4, 5, 0, 0, 0]
    assert rows.tables[1][0].tolist() == [0, 7, 8, 0, 0, 0]
    a.block_tables[0][2] = 11  # copy-on-write of the last block
    a.block_tables[0].append(12)
    a.block_tables[1][1] = -1  # dropped out of the window
    a.num_dropped_blocks[1] = 2
    a.block_tables[1].append(13)
    assert rows.update([b, a]).tolist() == [1, 0]
    assert rows.tables[0][0].tolist() == [3, 4, 11, 12, 0, 0]
    assert rows.tables[1][0].tolist() == [0, 0, 8, 13, 0, 0]
    b.block_tables[0][0] = 14  # copy-on-write without an append
    rows.update([b])  # a stops decoding: its row is free, b's is synced
    assert rows.tables[0][1, 0] == 14
    c = Sequence(2, "2", 0, [1], params, 2, 2)
    c.block_tables = [[1], [2]]
    rows.update([b, c])
    assert rows.tables[0][0].tolist() == [1, 0, 0, 0, 0, 0]  # a's old entries cleared
    out = np.zeros((2, 2), np.int32)
    rows.gather(1, np.array([0, 1]), out)
    assert out.tolist() == [[2, 0], [10, 0]]
    c.block_tables[0] = list(range(7))
    with pytest.raises(ValueError, match="max_model_len / block_size"):
        rows.update([b, c])


def test_step_buffer_packs_int32_fields_and_grows():
    buf = StepBuffer(torch.device("cpu"), words=4)
    f = reserve_step(buf, num_tokens=3, num_samples=1, num_decodes=3, num_prefills=0,
                     key_counts=None, widths=[5, 5])
    f.context_lens[0][:] = [1, 2, 3]
    f.block_tables[1][0][:] = np.arange(15).reshape(3, 5)
    f.input_ids[0][:] = [7, 8, 9]
    assert f.context_lens[1].dtype == torch.int32 and f.context_lens[1].tolist() == [1, 2, 3]
    assert f.block_tables[1][1].tolist() == np.arange(15).reshape(3, 5).tolist()
    assert f.input_ids[1].tolist() == [7, 8, 9]
    assert buf.capacity >= buf.used > 4  # grown
    fields = [f.input_ids, f.positions, f.logits_indices, *f.slot_mapping, f.context_lens,
              f.cu_seqlens_q, *f.block_tables]
    assert all(dev.data_ptr() % 16 == 0 for _, dev in fields)  # Triton's aligned pointers
    fixed = StepBuffer(torch.device("cpu"), words=4, growable=False)
    with pytest.raises(ValueError, match="fixed buffer"):
        reserve_step(fixed, 3, 1, 3, 0, None, [5])


@pytest.mark.parametrize("window", [None, 5, 16, 40])
def test_cpu_decode_keys_against_a_per_row_rebuild(window):
    g = torch.Generator().manual_seed(7)
    lens = torch.tensor([1, 4, 17, 33, 64, 50], dtype=torch.int32)
    tables = torch.randint(0, 1000, (6, 20), generator=g, dtype=torch.int32)[:, :16]  # strided
    slots, mask = cpu_decode_keys(tables, lens, BS, window)
    width = max(n - max(0, n - window) if window else n for n in lens.tolist())
    assert slots.shape == mask.shape == (6, width) and slots.dtype == torch.int64
    assert slots.is_contiguous()  # the batched decode views it flat
    for row, n in enumerate(lens.tolist()):
        first = max(0, n - window) if window else 0
        t = tables[row].tolist()
        keys = [t[p // BS] * BS + p % BS for p in range(first, n)]
        pad = [t[0] * BS] * (width - len(keys))  # padding reads position 0 (masked anyway)
        assert slots[row].tolist() == keys + pad
        assert mask[row].tolist() == [True] * len(keys) + [False] * len(pad)
    empty = cpu_decode_keys(tables[:0], lens[:0], BS, window)
    assert empty[0].shape == (0, 0) and empty[1].shape == (0, 0)
