#!/usr/bin/env python3
"""A copy of a GGUF with one float32 tensor scaled by (1 + ulps * 2^-23): a change of a few
float32 ulps, which exact arithmetic barely feels. How far an engine's perplexity moves with
it measures how much that engine's rounding amplifies ulp-level differences (llama.cpp's CPU
products round their inputs to 8 bits), i.e. how reproducible its figure is.

    .venv/bin/python tools/nudge_gguf.py --model M --out /tmp/n.gguf [--tensor blk.0.attn_norm.weight] [--ulps 4]

Then, e.g., `tools/llamacpp_perplexity.py --model /tmp/n.gguf ...` and `ntr perplexity --model
/tmp/n.gguf ...` (docs/benchmarks.md, issue 13).
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tensor", default="blk.0.attn_norm.weight", help="a float32 tensor (a norm's weights)")
    ap.add_argument("--ulps", type=int, default=1, help="the scale's distance from 1 in units of 2^-23 (may be < 0)")
    args = ap.parse_args()
    shutil.copyfile(args.model, args.out)
    reader = GGUFReader(args.out, "r+")
    tensor = next((t for t in reader.tensors if t.name == args.tensor), None)
    if tensor is None or tensor.tensor_type != GGMLQuantizationType.F32:
        raise SystemExit(f"{args.tensor!r} is no float32 tensor of {args.model}")
    before = np.array(tensor.data, dtype=np.float32)
    tensor.data[:] = before * np.float32(1 + args.ulps * 2.0**-23)
    reader.data.flush()
    print(f"{args.out}: {args.tensor} x (1 + {args.ulps} * 2^-23), "
          f"{int((np.array(tensor.data) != before).sum())} of {before.size} values changed")


if __name__ == "__main__":
    main()
