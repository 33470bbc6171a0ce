#!/usr/bin/env python3
"""GPU benchmark (CuPy backend): builds the kernels, optionally runs the GPU tests, synthesizes
GGUF replicas of real models, and times them against the llama.cpp numbers of issue 3.

    PYTHONPATH=. python tools/bench_gpu.py [--tests] [--models qwen2.5-0.5b,llama3-8b-q4_k_m,...]
                                           [--out DIR] [--workdir DIR]

Models are written by `workers.model.synthetic.write_model` (real shapes, llama.cpp's Q4_K_M
choice of types, tokenizer keys from ../shared/llama-vocab or $NTR_VOCAB_DIR); for speed its
block generator is swapped for one that tiles a random pool and copies the scale fields a
16-row sample of the project's own generator chose (weights' values do not change the time).

Rows: decode tg128 at batch 1 (a 1-token prompt, then 128 single-token steps with greedy
argmax on the device: only ids leave it), prefill pp512, aggregate decode of 8/32/64
sequences after 128-token prompts. % roofline = (weight bytes read per token x tok/s) / the
measured device-to-device copy bandwidth (read + write). The "llama.cpp (issue)" column is
the issue's measurement on an H100 with the same synthetic replicas; with --llamacpp BIN_DIR
(a build holding llama-bench and llama-batched-bench: `LLAMACPP=1 tools/gpu_machine.sh`)
llama.cpp is also timed here on the same files, flash attention on, every layer on the GPU.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gguf import GGMLQuantizationType as Q  # noqa: E402

from kernels.quants import block_shape, dequantize  # noqa: E402
from workers.model import synthetic as synthetic_model  # noqa: E402
from workers.model.synthetic import SHAPES, llama_vocab_dir, q4_k_m_mix, uniform_mix, write_model  # noqa: E402

MODELS = {  # name -> (shape, mix, vocabulary)
    "qwen2.5-0.5b": (SHAPES["qwen2.5-0.5b"], q4_k_m_mix, "ggml-vocab-qwen2.gguf"),
    "llama3-8b-q4_k_m": (SHAPES["llama3-8b"], q4_k_m_mix, "ggml-vocab-llama-bpe.gguf"),
    "llama3-8b-q8_0": (SHAPES["llama3-8b"], uniform_mix(Q.Q8_0), "ggml-vocab-llama-bpe.gguf"),
    "llama3-70b-q4_k_m": (SHAPES["llama3-70b"], q4_k_m_mix, "ggml-vocab-llama-bpe.gguf"),
    # ggml-vocab-gemma3.gguf: not one of llama.cpp's; --write-vocab makes it (OWN_VOCABS)
    "gemma3-270m-q4_k_m": (SHAPES["gemma3-270m"], q4_k_m_mix, "ggml-vocab-gemma3.gguf"),
    "gemma3-12b-q4_k_m": (SHAPES["gemma3-12b"], q4_k_m_mix, "ggml-vocab-gemma3.gguf"),
}
# vocab-only GGUFs the replicas borrow that llama.cpp does not ship -> the registered model
# (workers/model/store.py) whose tokenizer they hold
OWN_VOCABS = {"ggml-vocab-gemma3.gguf": "gemma3-270m"}
# issue 3: llama.cpp on an H100 (flash attention on), and the targets
LLAMACPP = {("qwen2.5-0.5b", "tg128"): 884, ("llama3-8b-q4_k_m", "tg128"): 269, ("llama3-8b-q8_0", "tg128"): 237,
            ("llama3-8b-q4_k_m", "pp512"): 9265, ("llama3-8b-q4_k_m", "decode x64"): 4471,
            ("llama3-70b-q4_k_m", "tg128"): 42.6}
TARGET = {("qwen2.5-0.5b", "tg128"): 900, ("llama3-8b-q4_k_m", "tg128"): 400, ("llama3-8b-q8_0", "tg128"): 300,
          ("llama3-8b-q4_k_m", "pp512"): 9300, ("llama3-8b-q4_k_m", "decode x64"): 6700,
          ("llama3-70b-q4_k_m", "tg128"): 55}
_D_FIELDS = {Q.Q4_0: (0, None), Q.Q4_1: (0, 2), Q.Q5_0: (0, None), Q.Q5_1: (0, 2), Q.Q8_0: (0, None)}


def log(*a):
    print(*a, flush=True)


def fast_random_blocks(seed: int = 0):
    """A drop-in for synthetic_model.random_blocks at memcpy speed (see the module doc)."""
    original = synthetic_model.random_blocks
    pool = np.random.default_rng(seed).integers(0, 256, 64 << 20, dtype=np.uint8)

    def blocks(rng, shape, qtype, std):
        rows, cols = shape
        if qtype not in _D_FIELDS and qtype not in synthetic_model._K_SCALE_FIELDS:
            return original(rng, shape, qtype, std)
        block, size = block_shape(qtype)
        n = rows * (cols // block) * size
        raw = np.empty(n, np.uint8)
        for off in range(0, n, len(pool) // 2):
            m = min(len(pool) // 2, n - off)
            s = int(rng.integers(0, len(pool) - m + 1))
            raw[off:off + m] = pool[s:s + m]
        raw3 = raw.reshape(rows, cols // block, size)
        if qtype in _D_FIELDS:  # scale d (and additive min m) so the values are ~N(0, std)
            d_at, m_at = _D_FIELDS[qtype]
            sample = raw3[:16].copy()
            sample[..., d_at:d_at + 2] = np.float16(1.0).reshape(1).view(np.uint8)
            if m_at is not None:
                sample[..., m_at:m_at + 2] = 0
            v = dequantize(sample.reshape(len(sample), -1), qtype)
            d = std / float(v.std())
            raw3[..., d_at:d_at + 2] = np.float16(d).reshape(1).view(np.uint8)
            if m_at is not None:
                raw3[..., m_at:m_at + 2] = np.float16(-float(v.mean()) * d).reshape(1).view(np.uint8)
        else:  # K-quants: the project's generator picks d/dmin on a sample
            d_at, m_at = synthetic_model._K_SCALE_FIELDS[qtype]
            sample = original(rng, (min(rows, 16), cols), qtype, std).reshape(-1, cols // block, size)
            raw3[..., d_at:d_at + 2] = sample[0, 0, d_at:d_at + 2]
            if m_at is not None:
                raw3[..., m_at:m_at + 2] = sample[0, 0, m_at:m_at + 2]
        return raw3.reshape(rows, -1)

    return blocks


def synthesize(name: str, workdir: Path) -> Path:
    path = workdir / f"{name}.gguf"
    if path.exists():
        return path
    shape, mix, vocab = MODELS[name]
    t0 = time.perf_counter()
    saved = synthetic_model.random_blocks
    synthetic_model.random_blocks = fast_random_blocks()
    try:
        vocab_dir = llama_vocab_dir()
        if vocab_dir is None:
            raise SystemExit("no llama-vocab directory: set NTR_VOCAB_DIR")
        write_model(path, shape, vocab_dir / vocab, mix=mix)
    finally:
        synthetic_model.random_blocks = saved
    log(f"[{name}] wrote {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return path


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """--model, --models, --workdir (`model_files`' arguments) and --backend."""
    ap.add_argument("--model", help="a GGUF file or a pulled model's name")
    ap.add_argument("--models", help="bench_gpu.py's synthetic replicas, comma-separated")
    ap.add_argument("--backend", default="cupy")
    ap.add_argument("--workdir", help="where synthetic replicas are written (default: a temporary folder)")


def model_files(model: str | None, models: str | None, workdir: str | None) -> Iterator[tuple[str, Path]]:
    """(name, GGUF path) of a --model option (a file or a pulled model's name) and of each of a
    comma-separated --models option (synthetic replicas, written to workdir or to a temporary
    folder removed afterwards): the engines a benchmark of these options builds, one at a time."""
    if model:
        from workers.model import store

        yield Path(model).name, store.resolve(model)
    if models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(workdir or tmp)
            folder.mkdir(parents=True, exist_ok=True)
            for name in models.split(","):
                yield name, synthesize(name, folder)


def write_vocabs(out_dir: Path) -> None:
    """OWN_VOCABS into out_dir, each from its model (pulled first: the development machine's
    job; the GPU machine finds them in .device/extra.tar.xz's vocab/)."""
    from workers.model.store import pull

    out_dir.mkdir(parents=True, exist_ok=True)
    for vocab, model in OWN_VOCABS.items():
        path = synthetic_model.write_vocab_only(pull(model), out_dir / vocab)
        log(f"{path} ({path.stat().st_size / 1e6:.1f} MB, the tokenizer of {model})")


def prebuild(out_dir: Path) -> None:
    """Compile every kernel module ahead of time with nvcc (sm_90a) into out_dir/<sha1>.cubin,
    the name CupyBackend looks for in $NTR_CUBIN_DIR: a fresh GPU machine skips NVRTC."""
    from concurrent.futures import ThreadPoolExecutor

    from kernels.cupy.sources import all_modules, cubin_name, module_source

    out_dir.mkdir(parents=True, exist_ok=True)

    def build(job):
        file, prefix = job
        src = module_source(file, prefix)  # the exact text the backend compiles, so the same name
        target = out_dir / cubin_name(src)
        if not target.exists():
            tmp = target.with_suffix(".cu")
            tmp.write_text(src)
            subprocess.run(["nvcc", "-cubin", "-arch=sm_90a", "-std=c++17", "-o", str(target), str(tmp)], check=True)
            tmp.unlink()
        return f"{file} {prefix.strip()} -> {target.name}"

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for line in pool.map(build, all_modules()):
            log(line)


def copy_bandwidth(cp) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    n = 2 << 30
    a, b = cp.empty(n, cp.uint8), cp.empty(n, cp.uint8)
    a.fill(1)
    times = []
    for _ in range(12):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        cp.cuda.runtime.memcpyAsync(b.data.ptr, a.data.ptr, n, cp.cuda.runtime.memcpyDeviceToDevice, 0)
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
    del a, b
    return 2 * n / float(np.median(times[2:]))


def weight_bytes_per_token(engine) -> int:
    """Bytes of every matrix a decode step reads (one embedding row)."""
    total = 0
    for name, t in engine.gguf.tensors.items():
        if name == "token_embd.weight":
            total += t.n_bytes // t.shape[0]
            if engine.config.tied_embeddings:
                total += t.n_bytes
        else:
            total += t.n_bytes
    return total


def kv_bytes_per_token(engine, ctx: float) -> float:
    c = engine.config
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * 2 * ctx


def decode(engine, batch: int, prompt_len: int, steps: int, rng, ahead: bool = True, group: int = 8) -> float:
    """Aggregate decode tok/s of `batch` sequences after `prompt_len`-token prompts, greedy:
    Engine.greedy_decode (each step started on the device from the last one's ids), or with
    ahead=False a forward and a host argmax per step."""
    from workers.engine.engine import Sequence

    ops = engine.ops
    seqs = [Sequence(rng.integers(100, 20000, prompt_len).tolist()) for _ in range(batch)]
    try:
        for i in range(0, batch, group):  # prefill a few sequences at a time (activation memory)
            part = seqs[i:i + group]
            engine.reserve([(s, prompt_len) for s in part])
            ids = ops.argmax(engine.forward([(s, prompt_len) for s in part], device=True))
            for s, t in zip(part, ids):
                s.token_ids.append(int(t))
        engine.reserve([(s, 1) for s in seqs])
        engine.forward([(s, 1) for s in seqs], device=True)  # first step: captures the graph
        for s in seqs:
            s.token_ids.append(1)
        ops.to_numpy(ops.asarray(np.zeros(1)))
        t0 = time.perf_counter()
        steps_ahead = engine.greedy_decode(seqs) if ahead else None
        for _ in range(steps):
            if not ahead:
                engine.reserve([(s, 1) for s in seqs])
            ids = next(steps_ahead) if ahead else ops.argmax(engine.forward([(s, 1) for s in seqs], device=True))
            for s, t in zip(seqs, ids.tolist()):
                s.token_ids.append(t)
        return batch * steps / (time.perf_counter() - t0)
    finally:
        for s in seqs:
            engine.release(s)


def prefill(engine, n: int, rng, runs: int = 3, cp=None) -> float:
    """Median tok/s of `runs` n-token prompts after a warm-up; with cp, the last one is the
    "prefill" profiling range. With prompt graphs on (kernels/cupy/steps.py) the warm-up runs
    eagerly, the first run captures the pass and the later ones replay it: the median is a
    replay's rate; every run's rate is logged."""
    from workers.engine.engine import Sequence

    rates = []
    for i in range(runs + 1):
        s = Sequence(rng.integers(100, 20000, n).tolist())
        try:
            engine.reserve([(s, n)])
            with profiled(cp, "prefill") if cp is not None and i == runs else contextlib.nullcontext():
                t0 = time.perf_counter()
                engine.forward([(s, n)])
                rates.append(n / (time.perf_counter() - t0))
        finally:
            engine.release(s)
    log(f"  {n}-token prompts, tok/s (warm-up first): " + ", ".join(f"{r:.0f}" for r in rates))
    return float(np.median(rates[1:]))


class profiled:
    """A cudaProfilerStart/Stop range around the block when $NTR_PROFILE_RANGE names it ("step":
    one decode graph replay; "prefill": one 512-token prompt; an op of profile_ops, e.g.
    "gate_up tensor cores T=64"), for
    `ncu --profile-from-start off` (tools/gpu_machine.sh PROFILE=1)."""

    def __init__(self, cp, name: str):
        self.on = os.environ.get("NTR_PROFILE_RANGE") == name
        self.rt = cp.cuda.runtime

    def __enter__(self):
        if self.on:
            self.rt.profilerStart()

    def __exit__(self, *exc):
        if self.on:
            self.rt.profilerStop()


def graph_step_us(engine, cp, batch: int = 1) -> float:
    """GPU time of one replay of the last captured decode graph of `batch` sequences (no Python,
    no sync per step)."""
    g = next((g for key, g in reversed(engine.ops.steps.graphs.items()) if key[0] == batch and g.graph is not None), None)
    if g is None:
        return float("nan")
    stream = engine.ops.stream
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(5):
        g.graph.launch(stream)
    with profiled(cp, "step" if batch == 1 else f"step x{batch}"):
        g.graph.launch(stream)
        stream.synchronize()
    e0.record(stream)
    for _ in range(50):
        g.graph.launch(stream)
    e1.record(stream)
    e1.synchronize()
    return cp.cuda.get_elapsed_time(e0, e1) * 1e3 / 50


def parse_llama_bench(text: str) -> dict[str, float]:
    """tok/s by workload from `llama-bench -o jsonl` (one JSON object per test)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("{"):
            t = json.loads(line)
            if t.get("n_gen") == 0 and t.get("n_prompt"):
                out[f"pp{t['n_prompt']}"] = t["avg_ts"]
            elif t.get("n_prompt") == 0 and t.get("n_gen"):
                out[f"tg{t['n_gen']}"] = t["avg_ts"]
    return out


def parse_batched_bench(text: str) -> dict[str, float]:
    """Aggregate decode tok/s by workload ("decode xN") from `llama-batched-bench
    --output-format jsonl`: speed_tg counts every sequence's generated tokens."""
    return {f"decode x{t['pl']}": t["speed_tg"] for t in map(json.loads, (
        line for line in text.splitlines() if line.startswith("{") and '"speed_tg"' in line))}


def llamacpp_tok_s(bin_dir: Path, model: Path, big: bool) -> dict[str, float]:
    """llama.cpp on the same replica: pp512 and tg128 (llama-bench, 3 repetitions), and unless
    big, decode x8/x32/x64 after 128-token prompts, 32 steps, as `decode` times them."""
    building = bin_dir.parent.parent / "building"  # gpu_machine.sh's background build
    while building.exists():
        time.sleep(2)

    def run(*cmd):
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise RuntimeError(f"{cmd[0]} exited {r.returncode}: {r.stderr[-2000:]}")
        return r.stdout + r.stderr

    out = parse_llama_bench(run(bin_dir / "llama-bench", "-m", model, "-p", 512, "-n", 128, "-fa", 1, "-ngl", 99,
                                "-r", 3, "-o", "jsonl"))
    if not big:
        out.update(parse_batched_bench(run(bin_dir / "llama-batched-bench", "-m", model, "-c", 16384, "-b", 2048,
                                           "-ub", 512, "-npp", 128, "-ntg", 32, "-npl", "8,32,64", "-fa", "on",
                                           "-ngl", 99, "--output-format", "jsonl")))
    return out


def rerun(engine, cp, rng, batch: int, setting: str, value) -> str:
    """tg128 (batch 1) or decode x`batch` again with a backend setting changed (use_pdl's
    kinds, or a field of the backend's tuning as branch_segments, round_in_products), then the
    setting back; graphs are recaptured both ways."""
    ops, tuning = engine.ops, engine.ops.tuning

    def apply(v):
        if setting == "pdl":
            tuning.use_pdl(v)
        else:
            setattr(tuning, setting, v)
            ops.drop_graphs()

    saved = tuning.pdl_setting if setting == "pdl" else getattr(tuning, setting)
    try:
        apply(value)
        if batch == 1:
            decode(engine, 1, 1, 8, rng)
            tok_s = decode(engine, 1, 1, 128, rng)
        else:
            tok_s = decode(engine, batch, 128, 32, rng)
        return f"{tok_s:.1f} tok/s, replay {graph_step_us(engine, cp, batch):.0f} us/step"
    finally:
        apply(saved)
        decode(engine, 1, 1, 8, rng)


def launch_counts(engine, rng) -> str:
    """Kernels of each launch kind in the batch-1 decode graph (recaptured to count them)."""
    ops, counts = engine.ops, {}
    launcher = ops.launcher
    launch = launcher.launch

    def counting(kind, *a, **k):
        if launcher.capturing:
            counts[kind] = counts.get(kind, 0) + 1
        launch(kind, *a, **k)

    launcher.launch = counting
    try:
        ops.drop_graphs()
        decode(engine, 1, 1, 2, rng)
    finally:
        del launcher.launch
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def profile_ops(engine, cp, T: int) -> list[str]:
    """GPU time of each op of one decode layer at T tokens: 20 launches captured in a graph and
    replayed, so Python's launch cost is out of the number."""
    from kernels import AttentionBatch, StepInputs
    from kernels.cupy import elementwise, products
    from kernels.cupy.steps import make_step

    ops, m, c = engine.ops, engine.model, engine.config
    layer, stream = m.layers[0], ops.stream
    rng = np.random.default_rng(0)
    a = lambda *shape: cp.asarray(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    x, attn, gu = a(T, c.d_model), a(T, c.n_heads * c.head_dim), a(T, 2 * c.ffn_dim)
    attn2 = a(T, c.ffn_dim)
    qkv_out = c.n_heads * c.head_dim + 2 * c.n_kv_heads * c.head_dim
    ctx = 64
    bs = engine.kv.block_size
    tables = np.arange(T * (ctx // bs + 1), dtype=np.int32).reshape(T, -1)
    batch = AttentionBatch(np.arange(T + 1, dtype=np.int32), np.full(T, ctx, np.int32), tables,
                           (tables[:, (ctx - 1) // bs] * bs + (ctx - 1) % bs).astype(np.int32))
    positions = np.full(T, ctx - 1)
    step = StepInputs(positions, positions, batch)
    q, k, v = a(T, c.n_heads, c.head_dim), a(T, c.n_kv_heads, c.head_dim), a(T, c.n_kv_heads, c.head_dim)
    # a global layer's cache: a sliding one needs the sliding pool's tables, which this batch lacks
    kc, vc = next(((k, v) for k, v in engine.kv.layers if not k.sliding), engine.kv.layers[0])
    cases = {
        "qkv (norm fused)": (lambda: ops.matmul_add(ops.rmsnorm(x, layer.attn_norm, 1e-6), layer.wqkv, layer.bqkv)
                             if c.qkv_bias else ops.matmul(ops.rmsnorm(x, layer.attn_norm, 1e-6), layer.wqkv),
                             layer.wqkv),
        "qkv plain": (lambda: ops.matmul(x, layer.wqkv), layer.wqkv),
        "wo + residual": (lambda: ops.matmul_add(attn, layer.wo, x), layer.wo),
        "gate_up (norm fused)": (lambda: ops.matmul(ops.rmsnorm(x, layer.ffn_norm, 1e-6), layer.w_gate_up),
                                 layer.w_gate_up),
        "down (swiglu fused) + res": (lambda: ops.matmul_add(ops.swiglu(gu), layer.w_down, x), layer.w_down),
        "down plain": (lambda: ops.matmul(gu[:, :c.ffn_dim], layer.w_down), layer.w_down),
        "gate_up tensor cores": (lambda: products.qmma(ops, x, layer.w_gate_up, None, gu), layer.w_gate_up),
        "rmsnorm alone": (lambda: elementwise.rmsnorm(ops, x, layer.ffn_norm, 1e-6, cp.float32), None),
        "output (norm fused)": (lambda: ops.matmul(ops.rmsnorm(x, m.output_norm, 1e-6), m.output), m.output),
        "attention decode ctx 64": (lambda: ops.attention(ops.rope(q, step, c.inv_freq, c.rope_neox),
                                                          ops.rope(k, step, c.inv_freq, c.rope_neox), v, kc, vc,
                                                          step, 0.1), None),
        "embedding": (lambda: ops.embedding(m.embed, step), None),
    }
    # residual products that round their output for the next one (with their input's quantizer)
    if T == 1 and hasattr(ops.matmul_add(attn, layer.wo, x), "rounded"):
        cases["wo + res, rounded"] = (
            lambda: products.round_product(ops, ops.matmul_add(attn, layer.wo, x), layer.ffn_norm, 1e-6), layer.wo)
    if T == 1 and hasattr(ops.matmul_add(attn2, layer.w_down, x), "rounded"):
        cases["down + res, rounded"] = (
            lambda: products.round_product(ops, ops.matmul_add(attn2, layer.w_down, x), layer.attn_norm, 1e-6),
            layer.w_down)
    del qkv_out
    out = []
    step.dev = make_step(positions, positions, batch)
    try:
        for name, (fn, w) in cases.items():
            run = lambda: getattr(fn(), "materialize", lambda: None)()  # noqa: E731  (a lazy result runs now)
            try:
                with stream:
                    run()
                    stream.synchronize()
                    stream.begin_capture()
                    for _ in range(20):
                        run()
                    g = stream.end_capture()
                    g.launch(stream)
                    with profiled(cp, f"{name} T={T}"):
                        g.launch(stream)
                        stream.synchronize()
                    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                    e0.record(stream)
                    g.launch(stream)
                    e1.record(stream)
                    e1.synchronize()
                us = cp.cuda.get_elapsed_time(e0, e1) * 1e3 / 20
                extra = ""
                if w is not None:
                    extra = f"{'+'.join(sg.qtype.name for sg in w.segments):10s} {w.nbytes / 1e6:7.2f} MB {w.nbytes / us / 1e3:6.0f} GB/s"
                out.append(f"T={T} {name:26s} {us:8.1f} us  {extra}")
            except Exception as e:
                out.append(f"T={T} {name:26s} failed: {type(e).__name__}: {e}")
    finally:
        step.dev = None
    # the prefill path's parts, eager (large enough that launch cost does not matter)
    seg = layer.w_gate_up.segments[0]
    scratch = cp.empty((seg.rows, seg.K), cp.float16)
    for _ in range(2):
        products.dequant(ops, seg, scratch, f16=True)
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    with stream:
        e0.record(stream)
        for _ in range(5):
            products.dequant(ops, seg, scratch, f16=True)
        e1.record(stream)
        e1.synchronize()
    us = cp.cuda.get_elapsed_time(e0, e1) * 1e3 / 5
    moved = seg.nbytes + scratch.nbytes
    out.append(f"dequant gate_up to fp16 {us:8.1f} us  {moved / us / 1e3:6.0f} GB/s (read + write)")
    return out


def bench_model(name: str, args, cp, bw: float, rows: list, notes: list) -> None:
    from workers.engine.engine import Engine

    path = synthesize(name, Path(args.workdir))
    big = name.startswith("llama3-70b")
    t0 = time.perf_counter()
    engine = Engine(path, backend="cupy", max_context=4096, kv_cache_tokens=4096 if big else 64 * 256)
    load_s = time.perf_counter() - t0
    wb = weight_bytes_per_token(engine)
    log(f"[{name}] loaded in {load_s:.1f} s; {wb / 1e9:.3f} GB of weights read per token; "
        f"VRAM in use {cp.get_default_memory_pool().used_bytes() / 1e9:.1f} GB")
    rng = np.random.default_rng(0)

    def row(workload, tok_s, bytes_per_tok=None, extra=""):
        ref, tgt = LLAMACPP.get((name, workload)), TARGET.get((name, workload))
        roof = f"{100 * bytes_per_tok * tok_s / bw:.0f}%" if bytes_per_tok else ""
        r = dict(model=name, workload=workload, tok_s=round(tok_s, 1), llamacpp=ref, target=tgt,
                 vs_llamacpp=round(tok_s / ref, 2) if ref else None, roofline=roof, note=extra,
                 llamacpp_here=None, vs_here=None)
        rows.append(r)
        log(f"[{name}] {workload}: {tok_s:.1f} tok/s" + (f" (llama.cpp {ref}, target {tgt})" if ref else "")
            + (f", {roof} of copy roofline" if roof else "") + (f" {extra}" if extra else ""))

    def pp512(engine):
        try:
            pp = prefill(engine, 512, rng, cp=cp)
            pools = sum(g.pool.total_bytes() for g in engine.ops.steps.prompts.values()) / 2**20
            tuning = engine.ops.tuning
            granted, tuning.prompt_graph_bytes = tuning.prompt_graph_bytes, 0
            try:
                eager = prefill(engine, 512, rng)
            finally:
                tuning.prompt_graph_bytes = granted
            row("pp512", pp, extra=f"(prompt graphs off: {eager:.1f} tok/s; the graph's pool {pools:.0f} MiB)")
        except Exception:
            notes.append(f"{name} pp512 failed:\n{traceback.format_exc()}")
            log(notes[-1])

    if args.pp_only:  # (profiling a prompt: NTR_PROFILE_RANGE=prefill)
        pp512(engine)
        del engine
        return llamacpp_here(name, args, path, big, rows, notes)
    try:
        decode(engine, 1, 1, 8, rng)  # warm-up: compile, capture
        tok_s = decode(engine, 1, 1, 128, rng)
        us = graph_step_us(engine, cp)
        extra = f"(GPU graph replay {us:.0f} us/step = {1e6 / us:.0f} tok/s; {launch_counts(engine, rng)})"
        for kinds in filter(None, args.pdl_variants.split(";")):
            extra += f"; NTR_PDL={kinds}: {rerun(engine, cp, rng, 1, 'pdl', kinds)}"
        if args.unbranched:
            extra += f"; segments unbranched: {rerun(engine, cp, rng, 1, 'branch_segments', False)}"
        if args.sequential:
            extra += f"; a host argmax between steps: {decode(engine, 1, 1, 128, rng, ahead=False):.1f} tok/s"
        for setting in filter(None, args.settings.split(";")):
            key, value = setting.split("=")
            extra += f"; {setting}: {rerun(engine, cp, rng, 1, key, ast.literal_eval(value))}"
        row("tg128", tok_s, wb + kv_bytes_per_token(engine, 65), extra)
    except Exception:
        notes.append(f"{name} tg128 failed:\n{traceback.format_exc()}")
        log(notes[-1])
    if args.tg_only:
        return
    for T in (1, 4, 64):
        try:
            for line in profile_ops(engine, cp, T):
                log(f"[{name}]   {line}")
                notes.append(f"{name} {line}")
        except Exception:
            log(traceback.format_exc())
    if args.quick:
        return
    pp512(engine)
    if not big:
        for b in (8, 32, 64):
            try:
                tok_s = decode(engine, b, 128, 32, rng)
                us = graph_step_us(engine, cp, b)
                extra = f"(GPU graph replay {us:.0f} us/step = {b * 1e6 / us:.0f} tok/s)"
                for kinds in filter(None, args.pdl_variants.split(";")):
                    extra += f"; NTR_PDL={kinds}: {rerun(engine, cp, rng, b, 'pdl', kinds)}"
                if args.sequential:
                    extra += f"; a host argmax between steps: {decode(engine, b, 128, 32, rng, ahead=False):.1f} tok/s"
                if args.zero_apart:
                    extra += f"; outputs zeroed apart: {rerun(engine, cp, rng, b, 'zero_in_inputs', False)}"
                row(f"decode x{b}", tok_s, extra=extra)
            except Exception:
                notes.append(f"{name} decode x{b} failed:\n{traceback.format_exc()}")
                log(notes[-1])
    del engine
    llamacpp_here(name, args, path, big, rows, notes)


def llamacpp_here(name, args, path, big, rows, notes) -> None:
    """Frees the VRAM our engine (deleted by the caller) leaves, then (--llamacpp) times
    llama.cpp on the same replica and puts its figures beside ours in `rows`."""
    import gc

    import cupy as cp

    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()  # the VRAM is llama.cpp's now
    if args.llamacpp:
        try:
            theirs = llamacpp_tok_s(Path(args.llamacpp), path, big)
            log(f"[{name}] llama.cpp here: " + ", ".join(f"{w} {v:.1f}" for w, v in theirs.items()))
            for r in rows:
                if r["model"] == name and r["workload"] in theirs:
                    r["llamacpp_here"] = round(theirs[r["workload"]], 1)
                    r["vs_here"] = round(r["tok_s"] / theirs[r["workload"]], 2)
        except Exception:
            notes.append(f"{name} llama.cpp failed:\n{traceback.format_exc()}")
            log(notes[-1])


def markdown(rows: list, bw: float, device: str, command: str) -> str:
    lines = [f"Device: {device}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write).", "",
             f"Command: `{command}`", "",
             "| model | workload | tok/s | llama.cpp (issue) | target | ratio | llama.cpp here | ratio here "
             "| % copy roofline | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['workload']} | {r['tok_s']:,} | {r['llamacpp'] or ''} | {r['target'] or ''} "
                     f"| {r['vs_llamacpp'] or ''} | {r['llamacpp_here'] or ''} | {r['vs_here'] or ''} "
                     f"| {r['roofline']} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2.5-0.5b,llama3-8b-q4_k_m,llama3-8b-q8_0")
    ap.add_argument("--tests", action="store_true", help="run `pytest -m gpu` first")
    ap.add_argument("--quick", action="store_true", help="tg128 and per-matrix timings only")
    ap.add_argument("--tg-only", action="store_true", help="tg128 only")
    ap.add_argument("--pp-only", action="store_true", help="pp512 only")
    ap.add_argument("--pdl-variants", default="0", help="';'-separated NTR_PDL values to time tg128 "
                    "and decode xN with too")
    ap.add_argument("--unbranched", action="store_true", help="time tg128 with a stacked weight's segments "
                    "in sequence too (not on a graph branch)")
    ap.add_argument("--sequential", action="store_true", help="time tg128 and decode xN with a forward and a "
                    "host argmax per step too (not Engine.greedy_decode)")
    ap.add_argument("--settings", default="", help="';'-separated backend settings (a field of "
                    "kernels/cupy/tuning.py's Tuning=Python literal, e.g. round_in_products=False) to time "
                    "tg128 with too, one at a time")
    ap.add_argument("--zero-apart", action="store_true", help="time decode xN with the tensor-core products' "
                    "outputs zeroed by a kernel of their own too (not by their input's)")
    ap.add_argument("--llamacpp", metavar="BIN_DIR", help="also time llama.cpp's llama-bench and "
                    "llama-batched-bench from BIN_DIR on the same replicas (once BIN_DIR/../../building is gone)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--workdir", default="/tmp/ntr-bench")
    ap.add_argument("--prebuild", metavar="DIR", help="only compile the kernels with nvcc into DIR (no GPU needed)")
    ap.add_argument("--write-replica", metavar="MODEL", help="only write MODEL's replica into --workdir, print its path")
    ap.add_argument("--write-vocab", metavar="DIR", help="only write the vocab-only GGUFs llama.cpp does not ship "
                    f"({', '.join(OWN_VOCABS)}) into DIR, from their models (no GPU needed)")
    args = ap.parse_args()
    if args.prebuild:
        prebuild(Path(args.prebuild))
        return
    if args.write_vocab:
        write_vocabs(Path(args.write_vocab))
        return
    if args.write_replica:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        print(synthesize(args.write_replica, Path(args.workdir)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=. python tools/bench_gpu.py " + " ".join(sys.argv[1:])

    if args.tests:
        t0 = time.perf_counter()
        with open(out / "tests.log", "w") as f:
            rc = subprocess.call([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "--tb=short", "-p",
                                  "no:cacheprovider", "--timeout=300", "tests/test_cupy_backend.py", "tests/test_gpu_end_to_end.py"],
                                 cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        tail = (out / "tests.log").read_text().splitlines()
        log("\n".join([line for line in tail if "FAILED" in line or "ERROR" in line][:40]))
        log(f"pytest -m gpu: exit {rc}; {tail[-1] if tail else ''} ({time.perf_counter() - t0:.0f} s)")

    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    device = f"{props['name'].decode()} ({props['multiProcessorCount']} SMs)"
    bw = copy_bandwidth(cp)
    log(f"{device}: copy bandwidth {bw / 1e12:.2f} TB/s")
    rows, notes = [], []
    for name in args.models.split(","):
        try:
            bench_model(name, args, cp, bw, rows, notes)
        except Exception:
            notes.append(f"{name} failed:\n{traceback.format_exc()}")
            log(notes[-1])
        finally:  # the disk holds one big replica at a time
            (Path(args.workdir) / f"{name}.gguf").unlink(missing_ok=True)
        md = markdown(rows, bw, device, command)  # written after every model: a timeout keeps the rest
        (out / "bench.md").write_text(md + "\n```\n" + "\n".join(notes) + "\n```\n")
        (out / "bench.json").write_text(json.dumps(dict(rows=rows, copy_bw=bw, device=device), indent=1))
    log("\n" + md)


if __name__ == "__main__":
    main()
