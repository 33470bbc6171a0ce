#!/usr/bin/env python3
"""llama.cpp's tokenization of a generated corpus, for the tokenizer's differential test.

The corpus (``corpus(seed, n)``) is reproducible from its seed: pieces of English prose and
license text, code, digits, whitespace runs (spaces, tabs, newlines, leading and trailing),
punctuation, accented Latin, Greek, Cyrillic, CJK, emoji, rare code points that only byte
fallback can spell, control characters, and special-token texts (which stay text:
parse_special is off). Each string is tokenized by llama-cpp-python's
``Llama(..., vocab_only=True).tokenize(text, add_bos=False, special=False)``.

    /tmp/llamacpp-venv/bin/python tools/make_tokenizer_reference.py \\
        --model ~/.cache/ntransformer/models/gemma-3-270m-q4_k_m.gguf \\
        --out tests/data/tokenizer_gemma3.json [--n 1200 --seed 19]

The output holds the model's sha256, the seed, and [text, ids] pairs; tests/test_tokenizer_gemma3.py
compares workers/model/tokenizer.py against it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random

WORDS = ("the of and to in is that for it as with was on be by this are or from at which an have not "
         "function return value class import print error file data model token window attention layer "
         "Gemma llama tokenizer sentence piece byte fallback license software copyright").split()
CODE = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "SELECT id, name FROM users WHERE age >= 21;", "<div class=\"row\">{{ value }}</div>",
        "x = [1, 2, 3]; y = {'a': 1}", "#include <stdio.h>", "fn main() { println!(\"hi\"); }",
        "if (a && b || !c) { return -1; }", "lambda x: x**2 + 3.14e-2", "// TODO: fix this\n"]
SCRIPTS = ["café naïve façade déjà vu", "Ελληνικά γράμματα", "Привет, мир", "日本語のテキスト",
           "中文字符测试", "한국어 문장", "עברית", "العربية", "हिन्दी", "ไทย", "🚀🔥👍😀🎉", "∑∫√∞≈≠",
           "ﬁ ﬂ ẞ ǅ", "\u200b\u200d\ufeff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0001f9ea\U0001fae0", "ꙮ ᚠᛇᚻ ⵣ"]
SPECIAL = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<pad>", "<unk>", "<mask>", "[@BOS@]",
           "<0x41>", "▁", "<image_soft_token>"]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t", "    "]


def _piece(rng: random.Random, licenses: list[str]) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    if kind == 1:
        text = rng.choice(licenses)
        start = rng.randrange(len(text) - 200)
        return text[start:start + rng.randint(5, 200)]
    if kind == 2:
        return rng.choice(CODE)
    if kind == 3:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 16)))
    if kind == 4:
        return rng.choice(WHITESPACE)
    if kind == 5:
        return "".join(rng.choice("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") for _ in range(rng.randint(1, 6)))
    if kind == 6:
        return rng.choice(SCRIPTS)
    if kind == 7:
        return rng.choice(SPECIAL)
    # Any code point outside the surrogates: most need byte fallback or rare tokens.
    cps = [rng.choice((rng.randrange(0x20, 0x800), rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x110000)))
           for _ in range(rng.randint(1, 4))]
    return "".join(map(chr, cps))


def corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    licenses = [open(f"/usr/share/common-licenses/{name}", encoding="utf-8").read()
                for name in ("Apache-2.0", "GPL-3", "MPL-2.0")]
    out = []
    for _ in range(n):
        joiner = rng.choice(["", " ", "\n"])
        out.append(joiner.join(_piece(rng, licenses) for _ in range(rng.randint(1, 4))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=19)
    args = ap.parse_args(argv)

    import llama_cpp
    from llama_cpp import Llama

    sha = hashlib.sha256()
    with open(args.model, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    llm = Llama(model_path=args.model, vocab_only=True, verbose=False)
    cases = [[t, llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)] for t in corpus(args.seed, args.n)]
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"generator": "tools/make_tokenizer_reference.py", "llama_cpp_python_version": llama_cpp.__version__,
                   "model_sha256": sha.hexdigest(), "seed": args.seed,
                   "tokenize": "Llama(vocab_only=True).tokenize(text.encode('utf-8'), add_bos=False, special=False)",
                   "cases": cases}, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(cases)} cases, {sum(len(c[1]) for c in cases)} tokens, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
