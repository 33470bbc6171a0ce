#!/usr/bin/env python3
"""RotateKV on the GPU: decode attention by KV cache type and context, and end-to-end decode.

    PYTHONPATH=. python tools/bench_kv.py [--model llama3-8b-q4_k_m] [--types f16,q8,q4,q3,q2]
        [--contexts 4096,16384,32768] [--batches 1,16] [--e2e-context 16384] [--e2e-tokens 64] [--out DIR]
    python tools/bench_kv.py --capacity [--kv-gib 8] [--seqs 32]     # no GPU: bytes and tokens by type

Attention: one layer's decode step of the replica's shape (q and k with their RoPE pending, as
the model hands them over; the store of the new token and the attention over every sequence's
context: for a RotateKV type kv_store_q then attn_decode),
captured 20 times in a CUDA graph as a decode step's graph launches it (PDL where the backend
enables it) and replayed; the rows read (K and V of every cached token) over the time is the
bandwidth. The 20 calls take turns over as many caches as hold COLD_BYTES together, as a
model's layers each read their own: each call's rows come from HBM, not from L2 (before
2026-12-05 the rows replayed one cache, and a q type's cache at batch 1 stayed in the 50 MB L2
from 16k on while f16's did not). End to end: the replica (tools/bench_gpu.py's synthesis) under each KV type, a
prompt of --e2e-context random tokens, then --e2e-tokens greedy tokens: decode tok/s (the
first decode step, which captures the step's graph, included), the first step's time, the
rate of the steps after it, their median and longest step and how many took over twice the
median. One JSON line per row, also written to DIR/kv.jsonl. --capacity:
for the real models' KV shapes, each type's bytes per token (every layer) and the tokens a KV
budget of --kv-gib holds beside --seqs sequences' ring slots (kernels/kv_layout.py, as the
engine sizes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels import AttentionBatch, StepInputs, get_backend  # noqa: E402
from kernels.kv_layout import KV_TYPES, KVLayout  # noqa: E402

REPS = 20
COLD_BYTES = 256 << 20  # caches a row takes turns over hold this together: 5x the H200's L2
ROPE_THETA = 500000.0  # Llama 3's


# (layers, KV heads, head_dim) of the real models
KV_SHAPES = {"qwen2.5-0.5b": (24, 2, 64), "llama3-8b": (32, 8, 128), "llama3-70b": (80, 8, 128)}


def capacity(kv_gib: float, seqs: int) -> None:
    budget = int(kv_gib * 2**30)
    for model, (layers, kvh, d) in KV_SHAPES.items():
        base = None
        for name, t in KV_TYPES.items():
            lay = KVLayout(kvh, d, 16, t)
            tokens = (budget - layers * lay.fixed_bytes(seqs if t.quantized else 0)) // (layers * lay.bytes_per_token)
            base = base or tokens if name == "f16" else base
            print(json.dumps({"model": model, "kv": name, "bits_per_value": lay.bits_per_value,
                              "bytes_per_token": layers * lay.bytes_per_token,
                              "ring_bytes_per_seq": layers * lay.ring_bytes, "tokens": int(tokens),
                              "vs_f16": round(tokens / base, 2) if base else None,
                              "bits_per_value_at_4k": round(lay.bits_per_value_at(4096), 2)}))


def attention_row(ops, n_heads, n_kv, head_dim, kv, ctx, batch) -> dict:
    import cupy as cp

    from kernels.cupy.steps import make_step

    bs = 16
    per_seq = ctx // bs + 1
    layout = ops.kv_layout(n_kv, head_dim, bs, kv)
    read = 2 * batch * ctx * n_kv * layout.row_bytes
    caches = [ops.new_kv_cache(batch * per_seq, layout, recent_slots=batch)
              for _ in range(min(REPS, -(-COLD_BYTES // read)))]
    tables = np.arange(batch * per_seq, dtype=np.int32).reshape(batch, per_seq)
    pos = np.full(batch, ctx - 1)
    attn = AttentionBatch(np.arange(batch + 1, dtype=np.int32), np.full(batch, ctx, np.int32), tables,
                          (tables[:, (ctx - 1) // bs] * bs + (ctx - 1) % bs).astype(np.int32),
                          np.arange(batch, dtype=np.int32))
    step = StepInputs(pos, pos, attn)
    step.dev = make_step(pos, pos, attn)
    rng = np.random.default_rng(0)
    q, k, v = (cp.asarray(rng.standard_normal((batch, h, head_dim)).astype(np.float32))
               for h in (n_heads, n_kv, n_kv))
    # q and k reach attention with their RoPE pending, as the model's layers hand them
    inv_freq = ROPE_THETA ** (-np.arange(0, head_dim, 2) / head_dim)

    def call(i):
        k_cache, v_cache = caches[i % len(caches)]
        return ops.attention(ops.rope(q, step, inv_freq, False), ops.rope(k, step, inv_freq, False), v, k_cache,
                             v_cache, step, head_dim ** -0.5).materialize()

    stream = ops.stream
    pool = cp.cuda.MemoryPool()
    with stream, cp.cuda.using_allocator(pool.malloc):
        call(0)  # compiles, allocates the step's scratch
        stream.begin_capture()
        ops.launcher.capturing = True  # launched as in a decode graph (with PDL where it is enabled)
        try:
            for i in range(REPS):
                call(i)
        finally:
            ops.launcher.capturing = False
            graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(5):
            graph.launch(stream)
        end.record(stream)
        end.synchronize()
    us = cp.cuda.get_elapsed_time(start, end) * 1e3 / (5 * REPS)
    return {"row": "attention decode", "kv": kv, "ctx": ctx, "batch": batch, "caches": len(caches), "us": round(us, 2),
            "bytes_read": read, "gb_s": round(read / us / 1e3, 1), "bits_per_value": layout.bits_per_value}


def e2e_row(path, kv, ctx, tokens) -> dict:
    from workers.engine.engine import Engine
    from workers.engine.sampling import SamplingParams

    engine = Engine(path, backend="cupy", max_context=ctx + tokens + 64, kv_cache_tokens=ctx + tokens + 256,
                    kv_type=kv)
    ids = np.random.default_rng(1).integers(100, 20000, ctx).tolist()
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    # when each token reached the host: the first comes with the prompt, the second after the
    # first decode step (which captures the step's graph), the rest at the replays' rate
    stamps = [time.perf_counter() for _ in engine.generate(ids, params)]
    t = engine.last_timings
    gaps = 1e3 * np.diff(stamps[1:])  # the replays' steps: a few slow ones (recaptures) or all a bit
    p50 = float(np.median(gaps))
    row = {"row": "decode e2e", "kv": kv, "ctx": ctx, "tokens": tokens, "prefill_s": round(t.prefill_s, 3),
           "decode_tok_s": round(t.decode_tok_s, 1), "first_step_ms": round(1e3 * (stamps[1] - stamps[0]), 1),
           "steady_tok_s": round(1e3 / gaps.mean(), 1), "step_ms_p50": round(p50, 3),
           "step_ms_max": round(float(gaps.max()), 2), "steps_over_2x_p50": int((gaps > 2 * p50).sum()),
           "kv_cache_bytes": engine.kv.nbytes}
    del engine
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b-q4_k_m")
    ap.add_argument("--types", default="f16,q8,q4,q3,q2")
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--e2e-context", type=int, default=16384)
    ap.add_argument("--e2e-tokens", type=int, default=64, help="greedy tokens decoded (at least 3)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--workdir", default="/tmp/ntr-bench")
    ap.add_argument("--capacity", action="store_true")
    ap.add_argument("--kv-gib", type=float, default=8.0)
    ap.add_argument("--seqs", type=int, default=32)
    args = ap.parse_args()
    if args.e2e_tokens < 3:
        ap.error("--e2e-tokens must be at least 3 (the first step is timed apart from the rest)")
    if args.capacity:
        return capacity(args.kv_gib, args.seqs)
    import cupy as cp

    from tools.bench_gpu import MODELS, synthesize
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = MODELS[args.model][0]
    ops = get_backend("cupy")
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "kv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    types = args.types.split(",")
    for ctx in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            for kv in types:
                emit(attention_row(ops, shape.n_heads, shape.n_kv_heads, shape.head_dim or shape.d_model // shape.n_heads,
                                   kv, ctx, batch))
                cp.get_default_memory_pool().free_all_blocks()
    if args.e2e_context:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        # the replica with a context window that holds the prompt (Llama-3-8B's file says 8192)
        shape, mix, vocab = MODELS[args.model]
        MODELS[args.model + "-long"] = (replace(shape, context_length=max(shape.context_length, 2 * args.e2e_context)),
                                        mix, vocab)
        path = synthesize(args.model + "-long", Path(args.workdir))
        for kv in types:
            t0 = time.perf_counter()
            emit({**e2e_row(path, kv, args.e2e_context, args.e2e_tokens), "wall_s": round(time.perf_counter() - t0, 1)})
            cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
