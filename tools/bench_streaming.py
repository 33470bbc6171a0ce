#!/usr/bin/env python3
"""Models larger than the budget: streamed layers timed on the GPU, each row in a process of
its own so that its device memory is measured from a clean start.

    PYTHONPATH=. python tools/bench_streaming.py [--rows 70b-24,70b-8,8b-3] [--out DIR]
                                                 [--llamacpp BIN_DIR] [--requant-streamed auto|TYPE]

Replicas come from tools/bench_gpu.py (real shapes, llama.cpp's Q4_K_M mix). A row loads the
replica under its budget (`Engine(vram_budget=)`, as `ntr generate --vram-gb` does), then
times: time to first token of a 128-token prompt; pp512 (one 512-token prompt, median of 2
after a warm-up); batch-1 decode (greedy, graphs); aggregate decode of 16 sequences after
128-token prompts; the host-to-device rate while decoding (streamed bytes a step x steps a
second) against a 1 GiB pinned copy timed in the same process (before the engine, whose
pool stops at the budget). Peak device memory is NVML's
used memory sampled every 10 ms, minus the reading before the process touched CUDA: it
counts the context, every pool, cuBLAS and the graphs. The placement's own prediction
(`ntr plan`, with the link measured in the process) is printed beside each number.
Each row also times what speculative decoding (issue 15) costs there: one verifying pass of
T = 1..16 tokens after a 128-token context, and one draft token through the resident layers
(half the layers where every layer is resident).
With --requant-streamed SPEC[,SPEC...], every row runs as the file is, then once per SPEC with
its streamed layers requantized at load (`Engine(requant_streamed=)`), as row `NAME+rq-SPEC`;
`streamed_gb` is then the bytes a decode token copies (the images), `file_streamed_gb` the same
at the file's types, and `requant_s` the load's extra time.
With --llamacpp, llama-bench times the same file with the largest -ngl that fits the budget
(its other layers on the host's cores), with and without memory mapping.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

GIB = 2**30
ROWS = {  # name -> (replica, budget GiB, KV tokens, sequences for the aggregate row, host RAM GiB for images)
    "70b-24": ("llama3-70b-q4_k_m", 24, 8192, 16, None),
    "70b-8": ("llama3-70b-q4_k_m", 8, 8192, 16, None),
    "8b-3": ("llama3-8b-q4_k_m", 3, 4096, 16, None),
    "70b-24-disk": ("llama3-70b-q4_k_m", 24, 8192, 16, 12),  # about half the streamed layers from disk
    "8b-3-disk": ("llama3-8b-q4_k_m", 3, 4096, 16, 1),  # three quarters of the streamed layers from disk
    "8b-resident": ("llama3-8b-q4_k_m", 24, 4096, 16, None),
}
VERIFY_TOKENS = (1, 2, 4, 8, 16)


class NvmlUsed:
    """The device's used memory through NVML (no CUDA context needed)."""

    def __init__(self, index: int = 0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self.lib.nvmlInit_v2()
        self.handle = ctypes.c_void_p()
        self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle))

    def __call__(self) -> int:
        info = (ctypes.c_ulonglong * 3)()  # total, free, used
        self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(info))
        return int(info[2])


class PeakSampler(threading.Thread):
    """NVML's used memory at its peak, and the default CuPy pool's bytes then (what the budget's
    pool limit caps; the rest is the context, cuBLAS, modules and the graphs' pools)."""

    def __init__(self, used):
        super().__init__(daemon=True)
        self.used, self.peak, self.pool_at_peak, self.stop = used, used(), 0, threading.Event()

    def run(self):
        import cupy as cp

        pool = cp.get_default_memory_pool()
        while not self.stop.wait(0.01):
            now = self.used()
            if now > self.peak:
                self.peak, self.pool_at_peak = now, pool.total_bytes()


def pass_seconds(engine, rng, draft_layers: int, runs: int = 3) -> dict:
    """Median seconds of a verifying pass of T tokens (logits for every row) and of one draft
    token through the first draft_layers layers, each after the same 128-token context."""
    from workers.engine.engine import Sequence

    context = 128
    s = Sequence(rng.integers(100, 20000, context + max(VERIFY_TOKENS)).tolist())
    engine.reserve([(s, len(s.token_ids))])
    try:
        engine.forward([(s, context)], device=True)

        def timed(n: int, layers: int | None) -> float:
            times = []
            for _ in range(runs + 1):
                t0 = time.perf_counter()
                engine.ops.argmax(engine.forward([(s, n)], all_logits=True, device=True, layers=layers))
                times.append(time.perf_counter() - t0)
                s.num_cached = context  # the same context for every pass
            return float(np.median(times[1:]))

        out = {f"verify_{n}": timed(n, None) for n in VERIFY_TOKENS}
        out["draft_layers"] = draft_layers
        out["draft_token"] = timed(1, tuple(range(draft_layers)))  # early exit: the first layers
        return out
    finally:
        engine.release(s)


def one_row(name: str, workdir: Path, decode_steps: int, requant: str | None = None) -> dict:
    used = NvmlUsed()
    before = used()
    sampler = PeakSampler(used)
    sampler.start()
    from bench_gpu import decode, prefill, synthesize

    from workers.engine.engine import Engine, Sequence

    from kernels.cupy.link import measure_h2d

    from workers.memory.disk_stream import DiskStream

    replica, budget_gb, kv_tokens, seqs, ram_gb = ROWS[name]
    path = synthesize(replica, workdir)
    h2d = measure_h2d()  # before the engine, whose pool stops at the budget
    t0 = time.perf_counter()
    engine = Engine(path, backend="cupy", max_context=kv_tokens, kv_cache_tokens=kv_tokens,
                    vram_budget=int(budget_gb * GIB), max_batch_tokens=512, max_logit_rows=seqs,
                    host_ram=None if ram_gb is None else int(ram_gb * GIB),
                    disk_open=lambda sizes: DiskStream(workdir / f"{name}.images", sizes), requant_streamed=requant)
    load_s = time.perf_counter() - t0
    p, rates = engine.placement, engine.rates
    streaming = engine.ops.streaming
    streamed_bytes = sum(streaming.image_nbytes.values()) if streaming else 0
    row = {"row": name if requant is None else f"{name}+rq-{requant}", "requant_streamed": requant,
           "file_streamed_gb": p.file_streamed_bytes / 1e9, "requant": p.requant, "replica": replica, "budget_gib": budget_gb, "kv_tokens": kv_tokens, "load_s": load_s,
           "resident_layers": p.tiers.count("vram"), "streamed_layers": len(p.streamed), "n_buffers": p.n_buffers,
           "why_buffers": p.why_buffers, "streamed_gb": streamed_bytes / 1e9, "planned_gib": p.device_bytes / GIB,
           "link": engine.link, "predicted": p.predict(rates, prompt=512, batch=seqs), "rates": rates.__dict__,
           "predicted_ttft_s": p.step_seconds(128, rates)}
    rng = np.random.default_rng(0)
    s = Sequence(rng.integers(100, 20000, 128).tolist())
    engine.reserve([(s, 128)])
    t0 = time.perf_counter()
    engine.ops.argmax(engine.forward([(s, 128)], device=True))
    row["ttft_s"] = time.perf_counter() - t0
    engine.release(s)
    row["pp512"] = prefill(engine, 512, rng, runs=2)
    row["tg"] = decode(engine, 1, 1, decode_steps, rng)
    row[f"decode_x{seqs}"] = decode(engine, seqs, 128, max(4, decode_steps // 4), rng, group=4)  # 512-token steps
    row["h2d_1gib_gb_s"] = h2d
    resident = p.tiers.count("vram")
    try:
        row["passes_s"] = pass_seconds(engine, rng, resident if p.streamed else engine.config.n_layers // 2)
    except Exception as e:  # the row's other numbers stand without it
        row["passes_s"] = {"error": repr(e)[:500]}
    if streaming is not None and streaming.disk is not None:
        row["disk"] = streaming.disk.stats()
        row["disk_layers"] = p.tiers.count("disk")
    row["h2d_while_decoding_gb_s"] = streamed_bytes * row["tg"] / 1e9
    if streamed_bytes:
        row["link_bound_tok_s"] = row["h2d_1gib_gb_s"] * 1e9 / streamed_bytes
    sampler.stop.set()
    sampler.join()
    row["peak_gib"] = (sampler.peak - before) / GIB
    row["pool_at_peak_gib"] = sampler.pool_at_peak / GIB
    return row


def llamacpp_rows(bin_dir: Path, path: Path, ngl: int) -> list[dict]:
    while (bin_dir.parents[1] / "building").exists():  # tools/gpu_machine.sh LLAMACPP=1 builds it meanwhile
        time.sleep(5)
    out = []
    for mode in ("mmap", "none"):  # memory-mapped (its default), or read into memory
        cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-p", "512", "-n", "32", "-r", "1", "-fa", "1",
               "-ngl", str(ngl), "-lm", mode, "-t", str(os.cpu_count()), "-o", "jsonl"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        for line in r.stdout.splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                kind = "pp512" if d.get("n_prompt") else "tg32"
                out.append({"ngl": ngl, "load_mode": mode, kind: d.get("avg_ts")})
        if r.returncode:
            out.append({"ngl": ngl, "load_mode": mode, "error": r.stderr[-1500:]})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| row | resident / streamed layers, slots | load s | TTFT s (pred) | pp512 (pred) | decode b1 (pred; "
             "link bound) | decode x16 (pred) | H2D decoding / 1 GiB copy | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:200]} |||||||| ")
            continue
        pr = r["predicted"]
        x = next(k for k in r if k.startswith("decode_x"))
        px = pr[next(k for k in pr if k.startswith("decode_x"))]
        bound = r.get("link_bound_tok_s", 0)
        lines.append(
            f"| {r['row']} | {r['resident_layers']} / {r['streamed_layers']}, {r['n_buffers']} | {r['load_s']:.0f} | "
            f"{r['ttft_s']:.2f} ({r['predicted_ttft_s']:.2f}) | {r['pp512']:.0f} ({pr['prefill_tok_s']:.0f}) | "
            f"{r['tg']:.2f} ({pr['decode_tok_s']:.2f}; {bound:.2f} = {r['tg'] / bound if bound else 0:.0%}) | "
            f"{r[x]:.1f} ({px:.1f}) | {r['h2d_while_decoding_gb_s']:.1f} / {r['h2d_1gib_gb_s']:.1f} = "
            f"{r['h2d_while_decoding_gb_s'] / r['h2d_1gib_gb_s']:.0%} | {r['peak_gib']:.2f} ({r.get('pool_at_peak_gib', 0):.2f} pool) |")
    lines += ["", "| row | streamed bytes a token, GB (at the file's types) | decode b1 tok/s | load s |", "|---|---|---|---|"]
    for r in rows:
        if "error" not in r:
            lines.append(f"| {r['row']} | {r['streamed_gb']:.2f} ({r['file_streamed_gb']:.2f}) | {r['tg']:.2f} | "
                         f"{r['load_s']:.0f} |")
    lines += ["", "| row | verifying pass of T tokens, ms: " + " / ".join(f"T={n}" for n in VERIFY_TOKENS)
              + " | draft token, ms (layers) |", "|---|---|---|"]
    for r in rows:
        ps = r.get("passes_s", {})
        if "draft_token" in ps:
            lines.append(f"| {r['row']} | " + " / ".join(f"{1e3 * ps[f'verify_{n}']:.1f}" for n in VERIFY_TOKENS)
                         + f" | {1e3 * ps['draft_token']:.1f} ({ps['draft_layers']}) |")
        elif ps:
            lines.append(f"| {r['row']} | failed: {ps['error'][:200]} | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="8b-3,70b-24,70b-8")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--workdir", default="/tmp/ntr-bench")
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--llamacpp", metavar="BIN_DIR", help="also time llama-bench with partial offload")
    ap.add_argument("--llamacpp-ngl", default="40", help="comma-separated -ngl values for the 70B replica")
    ap.add_argument("--requant-streamed", metavar="auto|TYPE[,...]",
                    help="also run every row with its streamed layers requantized at load, once per spec")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--one-requant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("ROW " + json.dumps(one_row(args.one, workdir, args.decode_steps, args.one_requant)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.requant_streamed is not None:
        from workers.engine.requant_streamed import check_spec

        specs = args.requant_streamed.split(",")
        for spec in specs:
            check_spec(spec)
    runs = [(name, spec) for name in filter(None, args.rows.split(","))
            for spec in ([None] if args.requant_streamed is None else [None] + specs)]
    for name, spec in runs:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--one", name, "--workdir", str(workdir), "--decode-steps",
                            str(args.decode_steps)] + ([] if spec is None else ["--one-requant", spec]),
                           capture_output=True, text=True)
        found = [json.loads(line[4:]) for line in r.stdout.splitlines() if line.startswith("ROW ")]
        label = name if spec is None else f"{name}+rq-{spec}"
        rows.append(found[0] if found else {"row": label, "error": (r.stdout + r.stderr)[-3000:]})
        print(json.dumps(rows[-1]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        (out / "streaming.json").write_text(json.dumps(rows, indent=1))
    md = table(rows)
    if args.llamacpp:
        from bench_gpu import synthesize

        path = synthesize("llama3-70b-q4_k_m", workdir)
        lrows = [r for ngl in args.llamacpp_ngl.split(",") for r in llamacpp_rows(Path(args.llamacpp), path, int(ngl))]
        (out / "streaming_llamacpp.json").write_text(json.dumps(lrows, indent=1))
        md += "\n\nllama.cpp (llama-bench, 70B replica):\n" + "\n".join(json.dumps(r) for r in lrows)
    (out / "streaming.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
