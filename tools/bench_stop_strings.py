"""Do long stop strings slow the other requests? Median time to first token of N concurrent
streams on the Serve app, with and without one more request that carries four stop strings
of the longest allowed length (workers/engine/sampling.py MAX_STOP_LENGTH).

    python tools/bench_stop_strings.py [--model NAME_OR_PATH] [--streams 64] [--tokens 8] [--rounds 2]

Loopback only: a private local Ray cluster and the app of cluster/app.py on a free
127.0.0.1 port, configured as configs/dev-cpu.yaml (numpy backend, 2 CPUs) with max_num_seqs
raised to hold every stream and the stop-string request at once (rather than queueing them).
Each round runs the load without and then with the
stop-string request, after one untimed warm-up; every request and the whole run are bounded
(--timeout). Prints the medians and their ratio, which should stay under 2.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.sampling import MAX_STOP, MAX_STOP_LENGTH  # noqa: E402
from workers.model import store as model_store  # noqa: E402

# Stop strings that a completion keeps partly matching (spaces, newlines, common letters), so
# that every token's check has held-back text to look at, and that never match whole.
LONG_STOPS = [(" " * (MAX_STOP_LENGTH - 1) + c) for c in "\n.e)"][:MAX_STOP]


def first_token_s(port: int, body: str, timeout_s: float) -> float:
    """Seconds from sending one streaming completion to its first token; reads the rest."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    first = None
    for line in conn.getresponse():
        if line.startswith(b"data: {") and first is None:
            first = time.perf_counter() - start
    conn.close()
    if first is None:
        raise RuntimeError("a stream ended without a token")
    return first


def load(port: int, streams: int, tokens: int, with_stops: bool, timeout_s: float) -> float:
    """Median time to first token of the normal streams (the stop-string request is not counted)."""
    body = lambda i: json.dumps({"prompt": f"# Task {i}: write a Python function that", "max_tokens": tokens,  # noqa: E731
                                 "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True})
    heavy = json.dumps({"prompt": "Write a long story about the sea.", "max_tokens": tokens * 4, "temperature": 0.7,
                        "seed": 0, "stop": LONG_STOPS, "ignore_eos": True, "stream": True})
    with ThreadPoolExecutor(streams + 1) as pool:
        extra = pool.submit(first_token_s, port, heavy, timeout_s) if with_stops else None
        ttfts = list(pool.map(lambda i: first_token_s(port, body(i), timeout_s), range(streams)))
        if extra is not None:
            extra.result()
    return statistics.median(ttfts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"registered name or GGUF path (default {model_store.DEFAULT_MODEL})")
    p.add_argument("--streams", type=int, default=64, help="concurrent normal streams")
    p.add_argument("--tokens", type=int, default=8, help="tokens per normal stream (the stop-string one: 4x)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300, help="seconds any one request may take")
    args = p.parse_args()
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ServerConfig

    dev = yaml.safe_load((REPO / "configs" / "dev-cpu.yaml").read_text())["applications"][0]["args"]
    streams = args.streams
    config = ServerConfig(**(dev | {"model": str(model_store.resolve(args.model)), "max_num_seqs": streams + 1,
                                    "max_batch_tokens": max(dev["max_batch_tokens"], streams + 1)}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=config.num_cpus + 2, include_dashboard=False, log_to_driver=False)
    results: dict[bool, list[float]] = {False: [], True: []}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config.model_dump()), name="bench", route_prefix="/")
        load(port, streams, args.tokens, False, args.timeout)  # warm-up
        for _ in range(args.rounds):
            for with_stops in (False, True):
                results[with_stops].append(load(port, streams, args.tokens, with_stops, args.timeout))
    finally:
        serve.shutdown()
        ray.shutdown()
    base, stops = statistics.median(results[False]), statistics.median(results[True])
    print(f"median time to first token of {streams} concurrent streams ({args.tokens} tokens each), "
          f"median of {args.rounds} rounds, max_num_seqs {config.max_num_seqs}:")
    for label, median, rounds in (("without", base, results[False]),
                                  (f"beside {MAX_STOP} stops of {MAX_STOP_LENGTH} chars", stops, results[True])):
        print(f"  {label + ':':<30} {median:7.2f} s   rounds: " + ", ".join(f"{r:.2f}" for r in rounds))
    print(f"  ratio {stops / base:.2f} (should stay under 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
