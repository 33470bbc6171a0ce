#!/usr/bin/env python3
"""What logprobs cost: decode tok/s with each token's logprob and top N against the same decode
without them, and a prompt scored token by token (an echo's logprobs) against the same prompt
unscored.

    PYTHONPATH=. python tools/bench_logprobs.py --backend cupy --models qwen2.5-0.5b,llama3-8b-q4_k_m \\
        [--batch 1,32] [--steps 64] [--prompt-tokens 512] [--top 5] [--runs 3] [--workdir DIR]
    PYTHONPATH=. python tools/bench_logprobs.py --model FILE.gguf --backend numpy --batch 1 --steps 8

--models are bench_gpu.py's synthetic replicas (real shapes and vocabularies, random weights);
--model is any GGUF file or pulled model name. Rows, greedy, best of --runs:
  decode: `batch` sequences after a 32-token prompt, one forward and Engine.sample a step
          (what a request that asks for logprobs takes: the greedy fast path that runs steps
          ahead needs only ids), without logprobs and with logprobs and top --top;
  prompt: --prompt-tokens random ids through the Scheduler in one chunk, one token generated,
          without its tokens' logprobs and with them and top --top (`Engine.start_scored`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_gpu import add_model_options, model_files  # noqa: E402
from workers.engine.engine import Engine, Sequence  # noqa: E402
from workers.engine.sampling import Sampler, SamplingParams  # noqa: E402
from workers.engine.scheduler import Scheduler  # noqa: E402

PROMPT_LEN = 32


def decode_rate(engine: Engine, batch: int, steps: int, top: int | None) -> float:
    """Aggregate decode tok/s of `batch` greedy sequences over `steps` steps (module docstring)."""
    rng = np.random.default_rng(0)
    seqs = [Sequence(rng.integers(100, 20000, PROMPT_LEN).tolist()) for _ in range(batch)]
    samplers = [Sampler(SamplingParams(temperature=0.0, logprobs=top)) for _ in seqs]

    def step(n: int) -> None:
        engine.reserve([(s, n) for s in seqs])
        picks = engine.sample(engine.forward([(s, n) for s in seqs], device=True), samplers)
        for s, (t, lp, _) in zip(seqs, picks):
            assert (lp is None) == (top is None)
            s.token_ids.append(t)

    try:
        step(PROMPT_LEN)
        step(1)  # outside the timing: captures the decode graph
        t0 = time.perf_counter()
        for _ in range(steps):
            step(1)
        return batch * steps / (time.perf_counter() - t0)
    finally:
        for s in seqs:
            engine.release(s)


def prompt_time(engine: Engine, tokens: int, top: int | None) -> float:
    """Seconds for a prompt of `tokens` through the scheduler in one chunk, one token generated."""
    prompt = np.random.default_rng(1).integers(100, 20000, tokens).tolist()
    sched = Scheduler(engine, max_batch_tokens=tokens)
    sched.submit("r", prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top))
    t0 = time.perf_counter()
    while sched.has_work:
        sched.step()
    return time.perf_counter() - t0


def bench(engine: Engine, name: str, batches: list[int], steps: int, prompt_tokens: int, top: int,
          runs: int) -> None:
    for batch in batches:
        rates = {t: max(decode_rate(engine, batch, steps, t) for _ in range(runs)) for t in (None, top)}
        print(f"| {name} | decode, batch {batch} | {rates[None]:.1f} tok/s | {rates[top]:.1f} tok/s | "
              f"{rates[top] / rates[None]:.2f}x |", flush=True)
    prompt_time(engine, prompt_tokens, top)  # outside the timing: the first scored pass's plans
    times = {t: min(prompt_time(engine, prompt_tokens, t) for _ in range(runs)) for t in (None, top)}
    print(f"| {name} | prompt of {prompt_tokens} | {1e3 * times[None]:.1f} ms | {1e3 * times[top]:.1f} ms | "
          f"{times[None] / times[top]:.2f}x |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    print(f"| model | what | without logprobs | with logprobs, top {args.top} | speed with / without |")
    print("|---|---|---|---|---|")
    sizes = dict(backend=args.backend, max_context=max(1024, args.prompt_tokens + 16),
                 kv_cache_tokens=max(max(batches) * (PROMPT_LEN + args.steps + 16), args.prompt_tokens + 16))
    run = dict(batches=batches, steps=args.steps, prompt_tokens=args.prompt_tokens, top=args.top, runs=args.runs)
    for name, path in model_files(args.model, args.models, args.workdir):
        bench(Engine(path, **sizes), name, **run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
