#!/usr/bin/env python3
"""Round-trip error of kernels/quantize.py on a model's real tensors against llama.cpp's own
quantization of the same tensors (a file tools/llamacpp_quantize.py made from the source).

    .venv/bin/python tools/quantize_error.py --source SRC.gguf --llamacpp LLAMA.gguf [--tensors a,b,...]

For each tensor whose type llama.cpp changed: x = the source tensor dequantized; prints the RMS
error against x of llama.cpp's tensor and of ours (quantize(x, the same type), no importance,
as llama.cpp's file was made without an imatrix), and their ratio (ours / llama.cpp's).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from kernels.quantize import quantize
from kernels.quants import dequantize
from workers.model.gguf_file import GGUFFile

DEFAULT = ("token_embd.weight,blk.0.attn_q.weight,blk.0.ffn_down.weight,blk.5.ffn_gate.weight,"
           "blk.2.ffn_down.weight,blk.5.ffn_down.weight,blk.12.attn_output.weight,blk.12.ffn_up.weight,blk.23.ffn_down.weight,"
           "blk.23.attn_v.weight")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--llamacpp", required=True)
    ap.add_argument("--tensors", default=DEFAULT)
    args = ap.parse_args()
    src, ref = GGUFFile(args.source), GGUFFile(args.llamacpp)
    for name in args.tensors.split(","):
        s, r = src.tensors[name], ref.tensors[name]
        if s.qtype == r.qtype:
            continue
        x = dequantize(s.data, s.qtype).reshape(s.shape[0], -1).astype(np.float64)
        theirs = dequantize(r.data, r.qtype).reshape(x.shape)
        ours = dequantize(quantize(x.astype(np.float32), r.qtype), r.qtype)
        e_ref, e_ours = (float(np.sqrt(np.mean((y - x) ** 2))) for y in (theirs, ours))
        print(json.dumps({"tensor": name, "from": s.qtype.name, "to": r.qtype.name, "rmse_llamacpp": e_ref,
                          "rmse_ours": e_ours, "ratio": round(e_ours / e_ref, 4)}))


if __name__ == "__main__":
    main()
