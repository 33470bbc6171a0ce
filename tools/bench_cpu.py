#!/usr/bin/env python3
"""CPU (NumPy backend) speed on a real GGUF model: prefill and batch-1 decode tok/s.

    .venv/bin/python tools/bench_cpu.py [--model NAME_OR_PATH] [--prompt-tokens 128] [--decode-tokens 32] [--runs 3]
        [--kv-type f16|q8|q4|q3|q2] [--decode-context 16]

Prefill: one batched forward over a prompt of random in-vocabulary ids (logits for the last
token only, as generation does). Decode: one token per forward with the KV cache, greedy,
through `Engine.generate` (sampling and detokenization included) after a prompt of
--decode-context tokens (what each step's attention reads), with the KV cache of --kv-type
(the backend's default if not given). Prints the best of
`--runs` and the weight bytes streamed per decoded token (the roofline on this machine is
that figure over the measured sgemv bandwidth). What logprobs cost, a scored prompt's
included: tools/bench_logprobs.py.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from workers.engine.engine import Engine, Sequence
from workers.engine.sampling import SamplingParams
from workers.model import store as model_store


def weight_bytes(engine: Engine) -> int:
    model = engine.model
    total = sum(w.nbytes for layer in model.layers.values() for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    return total + model.output.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kv-type")
    ap.add_argument("--decode-context", type=int, default=16)
    args = ap.parse_args()

    t0 = time.perf_counter()
    engine = Engine(model_store.resolve(args.model), backend="numpy", kv_type=args.kv_type)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = rng.integers(1000, 20000, max(args.prompt_tokens, args.decode_context)).tolist()

    prefill = []
    for _ in range(args.runs):
        seq = Sequence(prompt[:args.prompt_tokens])
        engine.reserve([(seq, args.prompt_tokens)])
        t0 = time.perf_counter()
        engine.forward([(seq, args.prompt_tokens)])
        prefill.append(args.prompt_tokens / (time.perf_counter() - t0))
        engine.release(seq)

    params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens + 1, ignore_eos=True)
    decode = []
    for _ in range(args.runs):
        for _ in engine.generate(prompt[:args.decode_context], params):
            pass
        decode.append(engine.last_timings.decode_tok_s)

    gb = weight_bytes(engine) / 1e9
    print(f"model: {engine.model_name} ({engine.config.arch}, {engine.config.n_layers} layers), load {load_s:.1f} s")
    print(f"prefill pp{args.prompt_tokens}: {max(prefill):.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in prefill)})")
    print(f"decode tg{args.decode_tokens} after {args.decode_context} tokens, kv {engine.kv.layout.type.name}: {max(decode):.2f} tok/s (runs: {', '.join(f'{x:.2f}' for x in decode)})")
    print(f"float32 weights read per decoded token: {gb:.2f} GB -> {gb * max(decode):.1f} GB/s effective")


if __name__ == "__main__":
    main()
