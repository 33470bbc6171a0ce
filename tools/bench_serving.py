"""Decode tok/s at batch 1: the engine alone, through the Ray actors, and through HTTP (SSE).

    python tools/bench_serving.py [--model NAME_OR_PATH] [--tokens 32] [--runs 3] [--backend numpy] [--streams N]
                                  [--config SERVE_YAML]

Each layer generates the same greedy completion (EOS ignored) and is timed from its first
token to its last, so prefill and model load do not count, and each is reported as the
median of --runs runs with its ratio to the engine, after one untimed warm-up run (CUDA graph
captures, the first request through each Ray and Serve path). The actors run on a private local
Ray cluster; the HTTP layer is the Serve app of cluster/app.py on a free loopback port.
With --streams N the actors and HTTP layers also run N concurrent streams and report their
aggregate (aggregate_rate). With --config the replica is the first ntransformer app of a Serve
config file (its budget, KV cache and batch limits; --model replaces its model path), and the
engine layer runs under the same placement.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine.sampling import SamplingParams  # noqa: E402
from workers.model import store as model_store  # noqa: E402

PROMPT = "Write a Python function that checks whether a number is prime."


WARMUP_RUNS = 1


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_engine(config, params: SamplingParams, runs: int) -> list[float]:
    from workers.compute_worker import engine_options
    from workers.engine.engine import Engine

    engine = Engine(config.model, backend=config.backend, **engine_options(**config.worker_args()))
    ids = engine.prompt_ids(PROMPT)
    rates = []
    for _ in range(WARMUP_RUNS + runs):
        stamps = [time.perf_counter() for _ in engine.generate(ids, params)]
        rates.append(decode_rate(stamps))
    return rates[WARMUP_RUNS:]


def aggregate_rate(all_stamps: list[list[float]], tokens: int) -> float:
    """Concurrent streams' tokens after each one's first, over the time from the earliest first
    token to the last token of any stream."""
    if any(len(s) != tokens for s in all_stamps):
        raise RuntimeError(f"a stream ended early: {[len(s) for s in all_stamps]} events")
    return sum(len(s) - 1 for s in all_stamps) / (max(s[-1] for s in all_stamps) - min(s[0] for s in all_stamps))


def bench_actors(config, params: SamplingParams, runs: int, streams: int) -> tuple[list[float], list[float]]:
    import ray

    from cluster.engine_client import EngineClient

    async def main():
        client = EngineClient(config)
        await client.info()  # model loaded

        async def stream() -> list[float]:
            return [time.perf_counter() async for _ in await client.submit(PROMPT, params)]

        rates, aggregate = [], []
        for _ in range(WARMUP_RUNS + runs):
            rates.append(decode_rate(await stream()))
        if streams > 1:
            for _ in range(WARMUP_RUNS + runs):
                aggregate.append(aggregate_rate(await asyncio.gather(*[stream() for _ in range(streams)]),
                                                params.max_tokens))
        ray.kill(client.worker)  # its cores go back before the HTTP layer starts its own worker
        return rates[WARMUP_RUNS:], aggregate[WARMUP_RUNS:]

    return asyncio.run(main())


def http_stream(port: int, body: str) -> list[float]:
    """Arrival time of each SSE chunk of one streaming completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    stamps = [time.perf_counter() for line in conn.getresponse() if line.startswith(b"data: {")]
    conn.close()
    return stamps


def bench_http(config, params: SamplingParams, runs: int, streams: int) -> tuple[list[float], list[float]]:
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from cluster.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config.model_dump()), name="bench", route_prefix="/")
    body = json.dumps({"prompt": PROMPT, "max_tokens": params.max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True})
    rates, aggregate = [], []
    try:
        for _ in range(WARMUP_RUNS + runs):
            rates.append(decode_rate(http_stream(port, body)))
        if streams > 1:
            with ThreadPoolExecutor(streams) as pool:
                for _ in range(WARMUP_RUNS + runs):
                    all_stamps = list(pool.map(lambda _: http_stream(port, body), range(streams)))
                    aggregate.append(aggregate_rate(all_stamps, params.max_tokens))
    finally:
        serve.shutdown()
    return rates[WARMUP_RUNS:], aggregate[WARMUP_RUNS:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"registered name or GGUF path (default {model_store.DEFAULT_MODEL})")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--num-cpus", type=float, default=2, help="CPUs the compute worker reserves (and threads it uses)")
    p.add_argument("--streams", type=int, default=1, help="also time this many concurrent HTTP streams")
    p.add_argument("--config", help="a Serve config file: its first ntransformer app's args (--model replaces the model)")
    args = p.parse_args()
    import ray

    from cluster import config as server_config

    path = model_store.resolve(args.model)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    if args.config:
        config = server_config.load(args.config)[1][0].model_copy(update={"model": str(path)})
    else:
        config = server_config.ServerConfig(model=str(path), backend=args.backend, num_cpus=args.num_cpus,
                                            num_gpus=1 if args.backend == "cupy" else 0, max_context=4096,
                                            kv_cache_gb=0.5, max_num_seqs=max(args.streams, 8))
    results = {"engine": bench_engine(config, params, args.runs)}
    aggregate = {}
    ray.init(num_cpus=max(4, int(config.num_cpus) * 2), include_dashboard=False, log_to_driver=False)
    try:
        results["actors"], aggregate["actors"] = bench_actors(config, params, args.runs, args.streams)
        results["http"], aggregate["http"] = bench_http(config, params, args.runs, args.streams)
    finally:
        ray.shutdown()
    base = statistics.median(results["engine"])
    print(f"decode tok/s at batch 1, {args.tokens} tokens, median of {args.runs} ({path.name}, {config.backend}, "
          f"budget {config.vram_budget_gb} GiB)")
    for layer, rates in results.items():
        rate = statistics.median(rates)
        print(f"  {layer:<7} {rate:7.2f} tok/s  {100 * rate / base:5.1f}% of engine   runs: "
              + ", ".join(f"{r:.2f}" for r in rates))
    for layer, rates in aggregate.items():
        if rates:
            print(f"  {layer} x{args.streams} streams: {statistics.median(rates):.2f} tok/s aggregate   runs: "
                  + ", ".join(f"{r:.2f}" for r in rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
