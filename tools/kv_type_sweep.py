#!/usr/bin/env python3
"""Perplexity of one model under each KV cache type and group size: how the RotateKV group
sizes in kernels/kv_layout.py were chosen (on a calibration text, never GPL-3 or
Apache-2.0), and what each part of it does: `--unrotated` repeats configurations with the
Hadamard transform replaced by the identity, `--plain-keys` with the keys' calibrated centre
and scale left at zero and one, `--window N` with each query reading its N latest positions
unquantized instead of RECENT (0: only the sink). NumPy backend.

    .venv/bin/python tools/kv_type_sweep.py --file /usr/share/common-licenses/LGPL-2.1 --ctx 512 --chunks 4 \\
        --configs f32,f16,q8:64,q4:32,q4:64,q3:32,q3:64,q2:16,q2:32,q2:64 [--unrotated q4:64] [--backend numpy]

One JSON line per configuration: {"kv", "group", "rotated", "plain_keys", "window", "bits_per_value",
"ppl", "vs_first"}.
The model loads once; each configuration gets a fresh KV cache of its type, calibrated anew.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import kv_layout, kv_quant  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.kv_cache import PagedKVCache  # noqa: E402
from workers.engine.perplexity import perplexity, text_ids  # noqa: E402
from workers.model import store  # noqa: E402


def run(engine: Engine, ids: list[int], ctx: int, kv: str, group: int, rotated: bool, plain_keys: bool,
        window: int) -> float:
    t = kv_layout.KV_TYPES[kv]
    if t.quantized:
        t = replace(t, group=group)
    c = engine.config
    layout = kv_layout.KVLayout(c.n_kv_heads, c.head_dim, engine.kv.block_size, t)
    engine.kv = PagedKVCache(engine.ops, c.n_layers, layout, engine.kv.num_blocks, engine.blocks.recent_slots,
                             engine.kv.sliding, engine.kv.sliding_blocks)
    rotate = kv_quant.hadamard
    if not rotated:
        kv_quant.hadamard = lambda x: x.astype("float32")
    try:
        if t.quantized:
            engine._calibrate_kv()
            for k, v in engine.kv.layers:
                k.recent_window = v.recent_window = window
                if plain_keys:
                    k.center[...], k.scale[...] = 0.0, 1.0
        return perplexity(engine, ids, ctx, 1).ppl, layout.bits_per_value
    finally:
        kv_quant.hadamard = rotate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--file", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--configs", default="f32,q8:64,q4:32,q4:64,q3:32,q3:64,q2:32,q2:64")
    ap.add_argument("--unrotated", default="", help="configs to repeat without the rotation")
    ap.add_argument("--plain-keys", action="store_true", help="no key centre and scale")
    ap.add_argument("--window", type=int, default=kv_layout.RECENT, help="latest positions read unquantized")
    args = ap.parse_args()
    engine = Engine(store.resolve(args.model), backend=args.backend, max_context=args.ctx, kv_cache_tokens=args.ctx,
                    kv_type="q8")  # a ring for the quantized configurations
    ids = text_ids(engine, Path(args.file).read_text(encoding="utf-8"))[:args.chunks * args.ctx]
    base = None
    rows = [(c, True) for c in args.configs.split(",")] + [(c, False) for c in args.unrotated.split(",") if c]
    for config, rotated in rows:
        kv, _, group = config.partition(":")
        ppl, bits = run(engine, ids, args.ctx, kv, int(group or 0), rotated, args.plain_keys, args.window)
        base = base or ppl
        print(json.dumps({"kv": kv, "group": int(group or 0), "rotated": rotated, "plain_keys": args.plain_keys,
                          "window": args.window, "bits_per_value": bits,
                          "ppl": round(ppl, 4), "vs_first": f"{100 * (ppl / base - 1):+.2f}%"}), flush=True)


if __name__ == "__main__":
    main()
