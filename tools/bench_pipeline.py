"""Aggregate decode tok/s of N concurrent greedy requests through a ComputeWorker whose forward
pass runs in P pipeline stages (P = 1: the engine in the worker itself), on a private local Ray.

    python tools/bench_pipeline.py [--model NAME_OR_PATH] [--pp 2] [--streams 8] [--tokens 32]
    python tools/bench_pipeline.py --local [--backend cupy] [--pp 2] [--tokens 32] [--actors] \
        [--vram-gb G] [--speculate 3|auto --skip-set tools/data/skip_qwen2.5-coder-0.5b.json \
        --drafter model|auto --draft-tree on|off|auto]

--local: the stages in this process instead (LocalPipeline, no Ray: the GPU machine has none),
one greedy stream through Engine.generate, P = 1 and P = --pp in turn, each after an untimed
warm-up (on the GPU it captures the decode graphs): decode tok/s; on the GPU P > 1 also with
the stages' decode graphs off; and the time one stage boundary's hand-off of a decode step's
residual stream takes (through the host, as `Stage.step` takes it). --actors: then the stages
as Ray actors, each reserving 1/P of the one GPU, chained by the compiled graph (a replica's
stages, on one device). --vram-gb: each run's budget, one process's or each stage's (layers
it does not hold stream; with --skip-set the draft's layers claim residency first).
--speculate K or auto (with a skip set, the skip drafter; else early exit; --drafter auto
adds the others): each run (stage graphs on) also speculating, after a warm-up of its own:
its decode tok/s against the same run's plain one, tokens a verifying pass, plain steps, the
passes by choice, and whether its tokens are plain decoding's.

Through Ray, every actor (the worker and each stage) reserves one CPU and runs one BLAS thread.
The streams are submitted together after one untimed warm-up round; the rate is the tokens that
arrive after every stream has its first over the time from then to the last token, so every
stream is decoding (prompts are prefilled in chunks beside the first decodes: those steps are
left out). Also printed: the activation bytes a decode step moves between stages for the
micro-batches the scheduler forms (one group a stage); the last stage draws the tokens, so
only they come back.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_serving import PROMPT  # noqa: E402
from workers.engine.sampling import SamplingParams  # noqa: E402
from workers.model import store as model_store  # noqa: E402

ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def round_of(worker, prompt: str, params: SamplingParams, streams: int, tag: str) -> list[list[float]]:
    """Arrival times of each stream's tokens (a poll answers for every stream at once)."""
    import ray

    rids = [f"{tag}-{i}" for i in range(streams)]
    for rid in rids:
        ray.get(worker.submit.remote(rid, prompt, params))
    stamps = {rid: [] for rid in rids}
    done: set[str] = set()
    while len(done) < streams:
        for rid, events in ray.get(worker.poll.remote(1.0)).items():
            now = time.perf_counter()
            for event in events:
                if "error" in event:
                    raise RuntimeError(f"{rid}: {event['error']}")
                stamps[rid].append(now)
                if event.get("finish_reason"):
                    done.add(rid)
    return list(stamps.values())


def decode_rate(all_stamps: list[list[float]], tokens: int) -> float:
    """Tokens per second once every stream decodes: from the latest first token to the last."""
    if any(len(s) != tokens for s in all_stamps):
        raise RuntimeError(f"a stream ended early: {[len(s) for s in all_stamps]} events")
    start = max(s[0] for s in all_stamps)
    after = sum(t > start for s in all_stamps for t in s)
    return after / (max(s[-1] for s in all_stamps) - start)


def local(path: Path, backend: str, pp: int, params: SamplingParams, actors: bool = False, spec=None,
          budget: int | None = None, order: tuple[int, ...] | None = None) -> None:
    import gc

    from workers.engine.engine import Engine

    runs = [(1, True)]
    if pp > 1:
        runs += [(pp, True), (pp, False)] if backend == "cupy" else [(pp, True)]
    for parts, graphs in runs:
        try:
            engine = Engine(path, backend=backend, max_context=1024, kv_cache_tokens=4096,
                            pipeline_parallel_size=parts, vram_budget=budget, resident_order=order)
        except ValueError as e:  # one process at a budget meant for each of P devices
            print(f"{path.name}, {backend}, P = {parts}: not run: {e}", flush=True)
            continue
        for stage in engine.pipeline.stages if engine.pipeline is not None else ():
            if not graphs:
                stage.ops.tuning.graphs = False
        report(engine, params, f"{path.name}, {backend}, P = {parts}{'' if graphs else ', stage graphs off'}",
               spec if graphs else None)
        if parts > 1 and graphs:
            sender, receiver = engine.pipeline.stages[:2]
            d = engine.config.d_model
            print(f"  handing one decode step's residual stream (1 x {d} float32, {d * 4:,} bytes) to the next "
                  f"stage through the host: {handoff_us(sender.ops, receiver.ops, d):.1f} us a boundary "
                  f"({parts - 1} a step)", flush=True)
            del sender, receiver
        del engine  # a large model's P = 1 and P runs do not fit the device together
        gc.collect()
        if backend == "cupy":
            import cupy as cp

            cp.get_default_memory_pool().free_all_blocks()
    if actors and pp > 1:
        run_actors(path, backend, pp, params, spec, budget, order)


def report(engine, params: SamplingParams, label: str, spec=None) -> None:
    """One greedy stream through engine.generate after an untimed warm-up (on the GPU it
    captures the decode graphs): its decode rate, printed under label; with spec (a
    Speculation) the same speculating."""
    ids = engine.prompt_ids(PROMPT)
    for _ in range(2):
        tokens = [e.token_id for e in engine.generate(ids, params)]
    plain = engine.last_timings.decode_tok_s
    print(f"{label}: decode {plain:.1f} tok/s ({engine.last_timings.decode_tokens} tokens; first ids {tokens[:4]})",
          flush=True)
    if spec is None:
        return
    for _ in range(2):
        drafted = [e.token_id for e in engine.generate(ids, params, spec)]
    rate, stats = engine.last_timings.decode_tok_s, engine.last_speculation
    tree = {None: "tree where it pays", True: "tree", False: "chain"}[spec.tree]
    print(f"{label}, {spec.drafter} k = {spec.k or 'auto'}, {tree}: decode {rate:.1f} tok/s "
          f"({rate / plain:.2f}x), {stats.tokens_per_pass:.2f} tokens a pass ({stats.passes} passes, "
          f"{stats.plain_steps} plain steps; {dict(stats.choices)}), "
          f"{'the same tokens' if drafted == tokens else 'tokens DIFFER from plain'}", flush=True)


def run_actors(path: Path, backend: str, pp: int, params: SamplingParams, spec=None,
               budget: int | None = None, order: tuple[int, ...] | None = None) -> None:
    """The stages as Ray actors on a private local Ray, each reserving 1/pp of the one GPU (the
    compiled graph's channels between them): what a replica runs, on one device."""
    import functools

    import ray

    from workers.engine.engine import Engine
    from workers.stage_worker import RayPipeline

    gpu = backend == "cupy"
    ray.init(address="local", num_cpus=pp + 1, num_gpus=1 if gpu else 0, include_dashboard=False,
             log_to_driver=False)
    try:
        engine = Engine(path, backend=backend, max_context=1024, kv_cache_tokens=4096, pipeline_parallel_size=pp,
                        vram_budget=budget, resident_order=order,
                        stage_runner=functools.partial(RayPipeline, num_gpus=1 / pp if gpu else 0.0))
        report(engine, params, f"{path.name}, {backend}, P = {pp}, stage actors "
                               f"({'1/' + str(pp) + ' GPU each' if gpu else 'CPU'})", spec)
        engine.pipeline.shutdown()
    finally:
        ray.shutdown()


def handoff_us(sender, receiver, d_model: int, n: int = 1000) -> float:
    """Microseconds one stage boundary of a batch-1 decode step costs `LocalPipeline`: the
    stream copied off the sender's device (`to_numpy`, which waits for it) and into the
    receiver's input array (`copy_into`), as `Stage.step` does, timed over n copies."""
    import numpy as np

    src = sender.asarray(np.ones((1, d_model), np.float32))
    dst = receiver.asarray(np.zeros((1, d_model), np.float32))
    for _ in range(20):
        receiver.copy_into(dst, sender.to_numpy(src))
    receiver.to_numpy(dst)
    t0 = time.perf_counter()
    for _ in range(n):
        receiver.copy_into(dst, sender.to_numpy(src))
    receiver.to_numpy(dst)  # the last copy in has landed
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"registered name or GGUF path (default {model_store.DEFAULT_MODEL})")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages (1: no stages)")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--local", action="store_true", help="the stages in this process, one stream (no Ray)")
    p.add_argument("--backend", default="numpy", help="with --local: the stages' backend")
    p.add_argument("--actors", action="store_true",
                   help="with --local: also the stages as Ray actors sharing the one GPU (1/P each)")
    p.add_argument("--vram-gb", type=float, help="with --local: each run's budget (one process's, each stage's)")
    p.add_argument("--speculate", help="with --local: also speculating, K drafted tokens a pass or auto")
    p.add_argument("--skip-set", help="with --speculate: the skip drafter's set (ntr calibrate-skip; else early exit)")
    p.add_argument("--drafter", choices=("model", "auto"), default="model",
                   help="with --speculate: the model drafter alone, or auto (lookup and early exit too)")
    p.add_argument("--draft-tree", choices=("on", "off", "auto"), default="off", help="with --speculate")
    args = p.parse_args()
    if args.local:
        path = model_store.resolve(args.model)
        spec = order = None
        budget = None if args.vram_gb is None else int(args.vram_gb * 2**30)
        if args.speculate:
            from workers.engine.skip_calibration import load_skip_set, residency_order
            from workers.engine.speculation import Speculation
            from workers.model.config import ModelConfig
            from workers.model.gguf_file import GGUFFile

            n_layers = ModelConfig.from_gguf(GGUFFile(path)).n_layers
            skip = load_skip_set(args.skip_set, n_layers) if args.skip_set else None
            drafter = "auto" if args.drafter == "auto" else "skip" if skip else "early-exit"
            spec = Speculation.from_setting(args.speculate, drafter, None, skip, args.draft_tree)
            # under a budget the skip draft's layers claim residency first, as `ntr generate` places them
            order = residency_order(args.skip_set, path) if skip and budget else None
        local(path, args.backend, args.pp, SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True),
              args.actors, spec, budget, order)
        return 0
    os.environ.update(ONE_THREAD)
    import ray

    from workers.compute_worker import ComputeWorker

    path = model_store.resolve(args.model)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    ray.init(address="local", num_cpus=args.pp + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": ONE_THREAD})
    try:
        worker = ComputeWorker.options(num_cpus=1).remote(str(path), max_context=4096, kv_cache_gb=0.5,
                                                          max_num_seqs=args.streams, pipeline_parallel_size=args.pp)
        info = ray.get(worker.info.remote(), timeout=900)
        round_of(worker, PROMPT, params, args.streams, "warm-up")
        t0 = time.perf_counter()
        rate = decode_rate(round_of(worker, PROMPT, params, args.streams, "timed"), args.tokens)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    from workers.model.config import ModelConfig
    from workers.model.gguf_file import GGUFFile

    c = ModelConfig.from_gguf(GGUFFile(path))
    rows = -(-args.streams // args.pp)  # a decode step's sequences in one group
    print(f"{path.name}, numpy, P = {args.pp}, {args.streams} concurrent greedy streams of {args.tokens} tokens, "
          f"one BLAS thread per actor, stages {[s['layers'] for s in info['pipeline_stages']]}")
    print(f"  aggregate decode {rate:.2f} tok/s (timed round {wall:.1f} s with its prefill)")
    if args.pp > 1:
        print(f"  a decode step of one group ({rows} sequences): {(args.pp - 1) * rows * c.d_model * 4:,} bytes of "
              f"activations between stages; the last stage draws the tokens ({rows * c.vocab_size * 4:,} bytes of "
              f"logits stay there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
