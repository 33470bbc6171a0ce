#!/usr/bin/env python3
"""llama.cpp's perplexity of a model on a text, as `llama-perplexity` computes it, through
llama-cpp-python: the reference `ntr perplexity` is compared with.

    /tmp/llamacpp-venv/bin/python tools/llamacpp_perplexity.py --model M.gguf --file F [--ctx 512] [--chunks N] [--kv-f32] [--threads 2]

The text is tokenized whole (BOS only where the model's metadata adds one), cut into
non-overlapping chunks of ctx tokens; each chunk is evaluated from an empty cache in one
batch (the first token replaced by BOS where the model adds one, as llama-perplexity does)
and scored on its second half: the logits at positions ctx/2 .. ctx-2 against the tokens
that follow them. Prints one JSON line {"ppl", "tokens", "chunks", "scored", "ctx", ...}.
Developer-only (llama-cpp-python is no project dependency; see make_llamacpp_reference.py
for the build).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, help="only the first N chunks")
    ap.add_argument("--n-batch", type=int, help="tokens per llama_decode (default: a chunk; 1: token by token, "
                                                 "where a build's batched CPU kernels crash)")
    ap.add_argument("--kv-f32", action="store_true",
                    help="K and V cached in float32 (llama.cpp's default is float16, which also rounds Q and the "
                         "softmax to float16 in its attention products)")
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    kv = {"type_k": 0, "type_v": 0} if args.kv_f32 else {}  # GGML_TYPE_F32
    n_batch = args.n_batch or args.ctx
    llm = Llama(model_path=args.model, **kv, n_ctx=args.ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=True,
                n_threads=args.threads, verbose=False)
    text = open(args.file, encoding="utf-8").read()
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    n_chunks = min(len(tokens) // args.ctx, args.chunks or len(tokens))
    first = args.ctx // 2
    nll, scored = 0.0, 0
    t0 = time.time()
    for c in range(n_chunks):
        chunk = list(tokens[c * args.ctx:(c + 1) * args.ctx])
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[first:args.ctx - 1], dtype=np.float64)
        targets = tokens[c * args.ctx + first + 1:(c + 1) * args.ctx]
        m = logits.max(axis=1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
        nll += float(np.sum(lse - logits[np.arange(len(targets)), targets]))
        scored += len(targets)
        print(f"chunk {c + 1}/{n_chunks}: ppl so far {math.exp(nll / scored):.4f}", flush=True)
    print(json.dumps({"ppl": math.exp(nll / scored), "tokens": len(tokens), "chunks": n_chunks, "scored": scored,
                      "ctx": args.ctx, "n_batch": n_batch, "kv": "f32" if args.kv_f32 else "f16", "seconds": round(time.time() - t0, 1),
                      "llama_cpp_python": llama_cpp.__version__}))


if __name__ == "__main__":
    main()
