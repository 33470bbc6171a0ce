#!/usr/bin/env python3
"""What constrained decoding costs: decode tok/s with a nested JSON schema (objects, arrays,
enums) against the same decode unconstrained, at each batch size.

    PYTHONPATH=. python tools/bench_constrained.py --backend cupy --models qwen2.5-0.5b,llama3-8b-q4_k_m \\
        [--batch 1,32] [--steps 128] [--workdir DIR]
    PYTHONPATH=. python tools/bench_constrained.py --model FILE.gguf --backend numpy --batch 1 --steps 8

--models are bench_gpu.py's synthetic replicas (real shapes and vocabularies, random weights);
--model is any GGUF file or pulled model name. Rows, greedy, after a 32-token prompt:
  plain: the production path of an unconstrained greedy decode (Engine.greedy_decode on a
         backend that samples on the device: steps run ahead, fed on the device);
  forward+sample: one forward and Engine.sample a step, no constraint (what a constrained
         row pays besides the grammar: the fast path it leaves);
  constrained: the same with every row under the schema: masks on the host while the forward
         runs, applied on the device. A row whose grammar has ended starts it again, so that
         every step decodes the whole batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_gpu import add_model_options, model_files  # noqa: E402
from workers.engine.engine import Engine, Sequence  # noqa: E402
from workers.engine.grammar import GrammarSpec  # noqa: E402
from workers.engine.sampling import Sampler, SamplingParams  # noqa: E402

# Nested objects, arrays of objects, enums, numbers and free strings: the grammar's work per
# token varies from a forced character to a 151k-token string lexeme.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
        "friends": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "score": {"type": "number"},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}}},
            "required": ["name", "score", "tags"]}},
    },
    "required": ["name", "role", "address", "friends"],
}
PROMPT_LEN = 32


def decode_rate(engine: Engine, batch: int, steps: int, mode: str) -> float:
    """Aggregate decode tok/s of `batch` greedy sequences over `steps` steps (module docstring)."""
    rng = np.random.default_rng(0)
    seqs = [Sequence(rng.integers(100, 20000, PROMPT_LEN).tolist()) for _ in range(batch)]
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA)) if mode == "constrained" else None
    params = SamplingParams(temperature=0.0, grammar=spec)
    samplers = [Sampler(params, engine.constraint(spec) if spec else None) for _ in seqs]
    ops = engine.ops
    try:
        engine.reserve([(s, PROMPT_LEN) for s in seqs])
        for s, (t, _, _) in zip(seqs, engine.sample(engine.forward([(s, PROMPT_LEN) for s in seqs], device=True),
                                                   samplers)):
            s.token_ids.append(t)
        engine.reserve([(s, 1) for s in seqs])  # a first step outside the timing: captures the graph
        for s, (t, _, _) in zip(seqs, engine.sample(engine.forward([(s, 1) for s in seqs], device=True), samplers)):
            s.token_ids.append(t)
        ops.to_numpy(ops.asarray(np.zeros(1)))
        t0 = time.perf_counter()
        ahead = engine.greedy_decode(seqs) if mode == "plain" and engine.decodes_ahead(params) else None
        for _ in range(steps):
            if ahead is not None:
                ids = next(ahead).tolist()
            else:
                engine.reserve([(s, 1) for s in seqs])
                ids = [t for t, _, _ in engine.sample(engine.forward([(s, 1) for s in seqs], device=True), samplers)]
            for s, sampler, t in zip(seqs, samplers, ids):
                s.token_ids.append(t)
                if sampler.constraint is not None and sampler.constraint.matcher.is_stopped():
                    sampler.constraint.matcher.reset()
        return batch * steps / (time.perf_counter() - t0)
    finally:
        for s in seqs:
            engine.release(s)


def bench(engine: Engine, name: str, batches: list[int], steps: int) -> list[str]:
    rows = []
    for batch in batches:
        rates = {mode: decode_rate(engine, batch, steps, mode) for mode in ("plain", "forward+sample", "constrained")}
        cost = 1 - rates["constrained"] / rates["plain"]
        rows.append(f"| {name} | {batch} | {rates['plain']:.1f} | {rates['forward+sample']:.1f} | "
                    f"{rates['constrained']:.1f} | {100 * cost:.1f}% |")
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--steps", type=int, default=128)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    print("| model | batch | plain tok/s | forward+sample tok/s | constrained tok/s | cost vs plain |")
    print("|---|---|---|---|---|---|")
    sizes = dict(backend=args.backend, max_context=1024, kv_cache_tokens=max(batches) * (PROMPT_LEN + args.steps + 16))
    for name, path in model_files(args.model, args.models, args.workdir):
        bench(Engine(path, **sizes), name, batches, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
