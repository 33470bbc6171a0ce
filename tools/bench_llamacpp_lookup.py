#!/usr/bin/env python3
"""llama.cpp's own prompt-lookup speculation against its plain decode, through llama-cpp-python,
on the code prompts of tools/data/speculation_prompts.json: greedy, batch 1, the rows
tools/bench_speculation.py prints for this project beside them.

    /tmp/llamacpp-venv/bin/python tools/bench_llamacpp_lookup.py --model FILE.gguf
        [--prompts 8] [--tokens 32] [--k 4,10] [--threads 2]

Decode tok/s: generated tokens after the first over the time after the first (streamed), summed
over the prompts. Runs without this project's dependencies (only llama_cpp, built as
tools/make_llamacpp_reference.py says). The speculation is llama-cpp-python's
LlamaPromptLookupDecoding: its drafts and their acceptance run in Python, llama.cpp's own
evaluation in C++.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

PROMPTS = Path(__file__).resolve().parent / "data" / "speculation_prompts.json"


def decode(llm: Llama, prompt: str, tokens: int) -> tuple[list[str], int, float]:
    """The streamed texts, tokens after the first and the seconds they took."""
    out, t_first = [], None
    for chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, top_k=1, stream=True):
        out.append(chunk["choices"][0]["text"])
        if t_first is None:
            t_first = time.perf_counter()
    return out, len(out) - 1, time.perf_counter() - t_first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=None, help="the first N code prompts (default: all)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--k", default="4,10", help="num_pred_tokens of each lookup row")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    prompts = json.loads(PROMPTS.read_text())["code"][:args.prompts]
    rows, plain_text = [], {}
    for k in [0, *(int(x) for x in args.k.split(","))]:
        draft = LlamaPromptLookupDecoding(num_pred_tokens=k) if k else None
        llm = Llama(args.model, n_ctx=1024, n_threads=args.threads, n_batch=512, draft_model=draft, verbose=False,
                    seed=0)
        n = s = 0.0
        differs = 0
        for i, p in enumerate(prompts):
            llm.reset()
            text, tokens, seconds = decode(llm, p, args.tokens)
            n, s = n + tokens, s + seconds
            if k == 0:
                plain_text[i] = "".join(text)
            elif "".join(text) != plain_text[i]:
                differs += 1
        row = {"config": f"llama.cpp lookup:{k}" if k else "llama.cpp plain", "decode_tok_s": n / s,
               "differs_from_plain": differs, "prompts": len(prompts), "tokens": args.tokens}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm
    base = rows[0]["decode_tok_s"]
    print("\n| config | decode tok/s | vs plain | text differs from plain |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['decode_tok_s']:.2f} | {r['decode_tok_s'] / base:.2f}x | "
              f"{r['differs_from_plain']} of {r['prompts']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
