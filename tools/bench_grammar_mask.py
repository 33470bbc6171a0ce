#!/usr/bin/env python3
"""The grammar engine's host cost on a model's vocabulary: building the vocabulary once,
compiling a nested JSON schema, and the next-token mask per token while a valid document is
fed token by token (what a constrained decode step pays on the host, beside the forward).

    PYTHONPATH=. python tools/bench_grammar_mask.py [--model NAME_OR_GGUF] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine.grammar import GrammarSpec, GrammarTokenizer  # noqa: E402
from workers.model import store  # noqa: E402
from workers.model.config import ModelConfig  # noqa: E402
from workers.model.gguf_file import GGUFFile  # noqa: E402
from workers.model.tokenizer import Tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_constrained import SCHEMA  # noqa: E402

DOCUMENT = {"name": "Ada Lovelace", "role": "admin", "address": {"city": "London", "zip": "W1"},
            "friends": [{"name": "Charles", "score": 9.5, "tags": ["red", "blue"]},
                        {"name": "Mary", "score": 8, "tags": []}]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    gguf = GGUFFile(store.resolve(args.model))
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    t0 = time.perf_counter()
    vocabulary = GrammarTokenizer(tokenizer, ModelConfig.from_gguf(gguf).vocab_size)
    print(f"vocabulary ({vocabulary.n_vocab} tokens): {time.perf_counter() - t0:.2f} s")
    ids = tokenizer.encode(json.dumps(DOCUMENT), parse_special=False)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    compile_s, mask_us = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        constraint = vocabulary.constraint(spec)
        compile_s.append(time.perf_counter() - t0)
        for token in ids:
            t0 = time.perf_counter()
            mask = constraint.mask()
            mask_us.append((time.perf_counter() - t0) * 1e6)
            if not (mask[token // 32] >> (token % 32)) & 1:
                raise SystemExit(f"the mask refuses token {token} of a valid document")
            constraint.consume(token)
    m = np.array(mask_us)
    print(f"compile: median {1e3 * np.median(compile_s):.2f} ms over {args.repeat}")
    print(f"mask per token ({len(ids)} tokens x {args.repeat}): median {np.median(m):.0f} us, mean {m.mean():.0f}, "
          f"p90 {np.percentile(m, 90):.0f}, max {m.max():.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
