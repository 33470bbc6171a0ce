#!/usr/bin/env python3
"""llama.cpp's own quantization of a GGUF (its `llama-quantize` through llama-cpp-python): the
baseline files `ntr quantize` is measured against, and the reference tensors its quantizers'
round-trip error is compared with (tools/quantize_error.py).

    /tmp/llamacpp-venv/bin/python tools/llamacpp_quantize.py --model IN.gguf --out OUT.gguf --ftype Q3_K_M [--threads 2]

Requantizes an already-quantized source (allow_requantize, as `llama-quantize
--allow-requantize` does). Developer-only: llama-cpp-python is no project dependency.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ftype", required=True, help="a LLAMA_FTYPE_MOSTLY_* suffix: Q3_K_M, Q2_K, Q4_0, ...")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import llama_cpp

    name = f"LLAMA_FTYPE_MOSTLY_{args.ftype}"
    if not hasattr(llama_cpp, name):
        raise SystemExit(f"unknown --ftype {args.ftype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.allow_requantize = True
    params.nthread = args.threads
    rc = llama_cpp.llama_model_quantize(args.model.encode(), args.out.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    print(f"{args.out}: {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
