#!/usr/bin/env python3
"""Speed of two code trees on the same GPU, interleaved: A, B, A, B, ... on the same replica.

    PYTHONPATH=. python tools/bench_ab.py --base TREE_A [--runs 5] [--models qwen2.5-0.5b,...] [--out DIR]

The working tree is B. For each model, the replica is written once (tools/bench_gpu.py's
synthesize), then one process per tree loads it (both engines stay resident, so the 70B
replica takes ~90 GB of the card) and the driver asks them in turn for one timing at a time:
tg128 (a 1-token prompt, 128 greedy steps) and, for the models that have it, decode x64
(64 sequences after 128-token prompts, 32 steps), each process timing with its own tree's
bench_gpu.decode. Prints each median, the B/A ratio and the spread (min-max) of each side,
and writes ab.json. Both processes warm up (kernels, graph capture) before the first run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {"tg128": (1, 1, 128), "decode x64": (64, 128, 32)}  # sequences, prompt tokens, steps
X64_MODELS = ("llama3-8b-q4_k_m",)


def load_bench(tree: Path):
    spec = importlib.util.spec_from_file_location("bench_gpu", tree / "tools" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(tree: Path, model: Path, big: bool) -> None:
    """Child: load the replica with this tree's code, then answer one timing per stdin line."""
    sys.path.insert(0, str(tree))
    bench = load_bench(tree)
    try:
        from workers.engine.engine import Engine
    except ImportError:  # the layout before workers/engine/ became a package
        from workers.engine import Engine
    engine = Engine(model, backend="cupy", max_context=4096, kv_cache_tokens=4096 if big else 64 * 256)
    rng = np.random.default_rng(0)
    bench.decode(engine, 1, 1, 8, rng)  # compile, capture
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        batch, prompt, steps = WORKLOADS[json.loads(line)["workload"]]
        print(json.dumps({"tok_s": bench.decode(engine, batch, prompt, steps, rng)}), flush=True)


def ask(proc, workload: str) -> float:
    proc.stdin.write(json.dumps({"workload": workload}) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())["tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="tree A (the code before the change)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--models", default="llama3-8b-q4_k_m,llama3-8b-q8_0,qwen2.5-0.5b,llama3-70b-q4_k_m")
    ap.add_argument("--workdir", default="/tmp/ntr-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--serve", nargs=3, metavar=("TREE", "MODEL", "BIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        tree, model, big = args.serve
        return serve(Path(tree), Path(model), big == "1")

    bench = load_bench(REPO)
    trees = {"A": Path(args.base).resolve(), "B": REPO}
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        model = bench.synthesize(name, Path(args.workdir))
        big = name.startswith("llama3-70b")
        procs = {}
        for side, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": f"{tree}:{os.environ.get('PYTHONPATH', '')}"}
            procs[side] = subprocess.Popen([sys.executable, __file__, "--serve", str(tree), str(model), "1" if big else "0"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
            assert json.loads(procs[side].stdout.readline())["ready"]  # one at a time: VRAM and upload bandwidth
        try:
            for workload in ["tg128"] + (["decode x64"] if name in X64_MODELS else []):
                times = {"A": [], "B": []}
                for _ in range(args.runs):
                    for side in ("A", "B"):
                        times[side].append(ask(procs[side], workload))
                a, b = (float(np.median(times[s])) for s in ("A", "B"))
                row = {"model": name, "workload": workload, "A": round(a, 1), "B": round(b, 1),
                       "B/A": round(b / a, 4), "A_runs": [round(t, 1) for t in times["A"]],
                       "B_runs": [round(t, 1) for t in times["B"]]}
                results.append(row)
                print(f"{name} {workload}: A {a:.1f} (min {min(times['A']):.1f}, max {max(times['A']):.1f}), "
                      f"B {b:.1f} (min {min(times['B']):.1f}, max {max(times['B']):.1f}) tok/s; B/A {b / a:.4f}",
                      flush=True)
        finally:
            for p in procs.values():
                p.stdin.close()
                p.wait(timeout=120)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ab.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
