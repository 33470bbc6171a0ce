#!/usr/bin/env python3
"""Produce numerical reference data from llama.cpp for ntransformer's tests.

For a fixed set of prompts (code in several languages, prose, non-ASCII/emoji
text and one chat-templated prompt) this script records, using llama.cpp via
llama-cpp-python:

* ``prompt_ids``  - llama.cpp's tokenization of the prompt;
* ``greedy_ids``  - a 32-token greedy continuation, generated the normal
  llama.cpp way (batched prompt eval, then one token per decode call,
  argmax of the last position's logits);
* ``positions``   - teacher-forced scoring of ``prompt_ids + greedy_ids`` in a
  single batched decode with logits for every position: for each position the
  top-40 ``[token_id, logit]`` pairs and the float64 log-sum-exp over the full
  vocabulary.

The result (``tests/data/llamacpp_reference.json``) is committed; the tests
compare ntransformer's tokenizer / logits / greedy decoding against it.  The
JSON's ``notes`` field documents exactly how every field was produced.

Usage::

    python tools/make_llamacpp_reference.py --model /path/to/qwen.gguf \
        --out tests/data/llamacpp_reference.json [--threads 2]
    python tools/make_llamacpp_reference.py --prompt-set gemma3 --model gemma-3-270m-q4_k_m.gguf \
        --out tests/data/llamacpp_reference_gemma3.json

``--prompt-set`` picks the prompts (PROMPT_SETS): ``qwen`` (the default model's) or
``gemma3`` (short prompts, chat turns, and prompts longer than Gemma 3's 512-token sliding
window, so the window's mask is exercised).

Dependency (developer-only, NOT a project or CI dependency)::

    python3.11 -m venv /tmp/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36

pip builds llama.cpp from source (CPU only; about 3.5 minutes on the 2-core machine). The
native build (GGML_NATIVE=ON: AVX512 and AMX here) crashed in llama_decode on any batch of
more than one token (2026-12-03); this portable one decodes prompts whole (2026-12-05; the
references in tests/data were made token by token with the native one). Then run this script with
/tmp/llamacpp-venv/bin/python.  The script is run by developers when the
reference data needs regenerating; CI never runs it.

The reference model is Qwen2.5-Coder-0.5B-Instruct Q4_K_M (arch qwen2,
sha256 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32);
another GGUF works but its hash is recorded so tests can tell them apart.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

N_GREEDY = 32
TOP_K = 40
N_CTX = 1024
N_BATCH = 1024  # teacher forcing scores a whole sequence in one batch
SEED = 1234
ROUND = 5

SYSTEM_MSG = "You are a helpful coding assistant. Answer concisely."
USER_MSG = "Write a Python function that checks whether a string is a palindrome."


def license_text(name: str, start: int, chars: int) -> str:
    """A stretch of a license text shipped with Debian: long, fixed, plain English."""
    with open(f"/usr/share/common-licenses/{name}", encoding="utf-8") as f:
        return f.read()[start:start + chars]


# (name, kind, text or messages).  kind "chat" prompts are messages rendered with the
# GGUF's chat template (or llama.cpp's built-in one for the architecture, when the file
# has none).
QWEN_PROMPTS = [
    ("python_fib", "code",
     'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
     "    if n < 2:\n        return n\n"),
    ("c_loop", "code",
     "#include <stdio.h>\n\nint main(void) {\n    int sum = 0;\n"
     "    for (int i = 0; i < 10; i++) {\n"),
    ("rust_config", "code",
     "use std::fs;\n\nfn read_lines(path: &str) -> std::io::Result<Vec<String>> {\n"
     "    let contents = fs::read_to_string(path)?;\n"),
    ("js_debounce", "code",
     "// Debounce a function so it runs at most once per `wait` milliseconds.\n"
     "function debounce(fn, wait) {\n  let timer;\n"),
    ("prose_printing", "prose",
     "The history of the printing press begins in the fifteenth century, "
     "when Johannes Gutenberg"),
    ("prose_tea", "prose",
     "To make a good cup of tea, first boil some fresh water, and then"),
    ("prose_primes", "prose",
     "In mathematics, a prime number is a natural number greater than 1 that"),
    ("unicode_mix", "unicode",
     "Café, naïve façade — déjà vu! 日本語のテキストです。 Привет, мир! "
     "🚀🔥👍 In English, this means"),
    ("chat_palindrome", "chat", [{"role": "system", "content": SYSTEM_MSG},
                                 {"role": "user", "content": USER_MSG}]),
]

GEMMA3_PROMPTS = [
    ("prose_printing", "prose",
     "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg"),
    ("prose_tea", "prose", "To make a good cup of tea, first boil some fresh water, and then"),
    ("python_fib", "code",
     'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'),
    ("unicode_mix", "unicode",
     "Café, naïve façade — déjà vu! 日本語のテキストです。 Привет, мир! 🚀🔥👍 In English, this means"),
    ("list_planets", "prose", "The eight planets of the solar system, in order from the Sun, are"),
    ("chat_capital", "chat", [{"role": "user", "content": "What is the capital of Japan? Answer in one sentence."}]),
    ("chat_system_turns", "chat", [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name a prime number larger than 10."},
        {"role": "assistant", "content": "11 is a prime number larger than 10."},
        {"role": "user", "content": "And one larger than 100?"}]),
    # Longer than the 512-token window: the sliding layers' mask matters from token 512 on.
    ("long_apache", "long", license_text("Apache-2.0", 0, 3300)),
    ("long_chat_mpl", "chat", [{"role": "user", "content": "Summarize this license text in two sentences:\n\n"
                                + license_text("MPL-2.0", 0, 2800)}]),
]

# name -> (prompts, allowed prompt lengths in tokens, top-k logits kept per position)
PROMPT_SETS = {
    "qwen": (QWEN_PROMPTS, (10, 60), TOP_K),
    "gemma3": (GEMMA3_PROMPTS, (5, 900), 20),
}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def render_chat(llm, messages):
    """Render chat messages as llama.cpp does: with the GGUF's chat template (jinja2, as
    llama-cpp-python's chat completion does), or, when the file has none, with llama.cpp's
    built-in template for the architecture (llama_chat_apply_template by name)."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        builtin = {"gemma3": b"gemma"}.get(llm.metadata.get("general.architecture"))
        if builtin is None:
            raise SystemExit("model has no tokenizer.chat_template and no built-in one")
        chat = (llama_cpp.llama_chat_message * len(messages))(
            *(llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages))
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_chat_apply_template(builtin, chat, len(messages), True, buf, len(buf))
        if not 0 < n <= len(buf):
            raise SystemExit(f"llama_chat_apply_template({builtin!r}) returned {n}")
        return buf.raw[:n].decode("utf-8"), f"llama.cpp built-in template {builtin.decode()!r}"
    eos_id = llm.token_eos()
    bos_id = llm.token_bos()
    tok_str = lambda i: llm.detokenize([i], special=True).decode("utf-8")  # noqa: E731
    fmt = Jinja2ChatFormatter(
        template=template,
        eos_token=tok_str(eos_id) if eos_id >= 0 else "",
        bos_token=tok_str(bos_id) if bos_id >= 0 else "",
        add_generation_prompt=True,
    )
    return fmt(messages=messages).prompt, "GGUF tokenizer.chat_template"


def last_logits(llm, n_vocab):
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def greedy(llm, prompt_ids, n_vocab, n_new):
    """Normal llama.cpp generation: batched prompt eval (logits only for the
    last token), then one token per decode; argmax (lowest id on ties)."""
    llm.reset()
    llm.eval(prompt_ids)
    out, step_logits = [], []
    for i in range(n_new):
        row = last_logits(llm, n_vocab)
        step_logits.append(row)
        tok = int(np.argmax(row))
        out.append(tok)
        if i + 1 < n_new:
            llm.eval([tok])
    return out, np.array(step_logits)


def score(llm_all, ids, top_k):
    """Decode of `ids` in batches of n_batch (one batch by default) with logits for every position."""
    llm_all.reset()
    llm_all.eval(ids)
    logits = np.array(llm_all.scores[: len(ids), :], dtype=np.float32, copy=True)
    positions = []
    for row in logits:
        r64 = row.astype(np.float64)
        m = r64.max()
        lse = m + math.log(np.exp(r64 - m).sum())
        order = np.argsort(-row, kind="stable")[:top_k]  # ties: lower id first
        positions.append({
            "top": [[int(i), round(float(row[i]), ROUND)] for i in order],
            "lse": round(float(lse), ROUND),
        })
    return logits, positions


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="qwen")
    ap.add_argument("--n-batch", type=int, default=N_BATCH,
                    help="tokens per llama_decode (1: token by token, where a build's batched CPU "
                         "kernels crash, as the AMX_INT8 build of 2026-12-03 here did)")
    ap.add_argument("--kv-f32", action="store_true",
                    help="K and V cached in float32 (llama.cpp's default float16 cache also rounds Q and the "
                         "softmax probabilities to float16 in its attention products)")
    args = ap.parse_args(argv)
    prompts, (min_len, max_len), top_k = PROMPT_SETS[args.prompt_set]

    import llama_cpp
    from llama_cpp import Llama

    t0 = time.time()
    model_sha = sha256_file(args.model)
    common = dict(model_path=args.model, n_ctx=N_CTX, n_batch=args.n_batch, n_ubatch=args.n_batch,
                  n_threads=args.threads, n_threads_batch=args.threads,
                  seed=SEED, verbose=False, **({"type_k": 0, "type_v": 0} if args.kv_f32 else {}))  # GGML_TYPE_F32
    # Generation instance: plain llama.cpp usage (logits only for the last
    # token of each decode).  Scoring instance: logits for every position.
    llm = Llama(logits_all=False, **common)
    llm_all = Llama(logits_all=True, **common)
    n_vocab = llm.n_vocab()
    md = llm.metadata
    add_bos_md = md.get("tokenizer.ggml.add_bos_token")
    eog_ids = sorted(i for i in range(n_vocab)
                     if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i))

    records = []
    chat_sources = set()
    all_agree = all_total = 0
    for name, kind, text in prompts:
        is_chat = kind == "chat"
        if is_chat:
            messages = text
            text, source = render_chat(llm, messages)
            chat_sources.add(source)
        # add_bos=True means llama.cpp's add_special: BOS is added only if the
        # vocab says so (tokenizer.ggml.add_bos_token), EOS likewise.
        prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=is_chat)
        if not (min_len <= len(prompt_ids) <= max_len):
            raise SystemExit(f"{name}: prompt has {len(prompt_ids)} tokens, want {min_len}..{max_len}")
        gen, step_logits = greedy(llm, prompt_ids, n_vocab, N_GREEDY)
        seq = prompt_ids + gen
        logits, positions = score(llm_all, seq, top_k)
        # Sanity: teacher-forced argmax at positions len(prompt)-1 .. len(seq)-2
        # should reproduce greedy_ids.
        n_p = len(prompt_ids)
        tf_argmax = logits.argmax(axis=1)
        agree = sum(int(tf_argmax[n_p - 1 + j]) == gen[j] for j in range(N_GREEDY))
        # Numerical noise between llama.cpp's own two evaluation orders (same
        # tokens, same positions): a yardstick for test tolerances.
        diff = np.abs(step_logits - logits[n_p - 1:n_p - 1 + N_GREEDY])
        noise = {"max_abs": round(float(diff.max()), ROUND),
                 "mean_abs": round(float(diff.mean()), ROUND)}
        all_agree += agree
        all_total += N_GREEDY
        first_div = next((j for j in range(N_GREEDY)
                          if int(tf_argmax[n_p - 1 + j]) != gen[j]), None)
        gen_text = llm.detokenize(gen, prev_tokens=prompt_ids, special=True).decode(
            "utf-8", errors="replace")
        eos_in_gen = [j for j, t in enumerate(gen) if t in set(eog_ids)]
        print(f"{name:16s} prompt={n_p:2d} tok  tf/greedy agree {agree}/{N_GREEDY}"
              f"  first_div={first_div}  |dlogit| max={noise['max_abs']:.3f}"
              f" mean={noise['mean_abs']:.4f}  eog_at={eos_in_gen}  -> {gen_text!r}")
        rec = {
            "name": name,
            "kind": kind,
            "text": text,
            "parse_special": is_chat,
            "prompt_ids": prompt_ids,
            "greedy_ids": gen,
            "greedy_text": gen_text,
            "tf_greedy_agreement": agree,
            "tf_vs_stepwise_logit_diff": noise,
            "positions": positions,
        }
        if is_chat:
            rec["chat_messages"] = messages
        records.append(rec)

    rate = all_agree / all_total
    print(f"overall teacher-forced vs token-by-token greedy agreement: "
          f"{all_agree}/{all_total} = {rate:.4f}")

    fa = llm.context_params.flash_attn_type
    fa_names = {getattr(llama_cpp, n): n for n in dir(llama_cpp)
                if n.startswith("LLAMA_FLASH_ATTN_TYPE_")}
    header = {
        "format_version": 1,
        "generator": "tools/make_llamacpp_reference.py",
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "model": {
            "file": os.path.basename(args.model),
            "sha256": model_sha,
            "architecture": md.get("general.architecture"),
            "name": md.get("general.name"),
            "n_vocab": n_vocab,
            "add_bos_token": (str(add_bos_md).lower() == "true"
                              if add_bos_md is not None else None),
            "bos_id": llm.token_bos(),
            "eos_id": llm.token_eos(),
            "eog_ids": eog_ids,
        },
        "llama_params": {
            "n_ctx": N_CTX,
            "n_batch": args.n_batch,
            "n_threads": args.threads,
            "n_threads_batch": args.threads,
            "seed": SEED,
            "flash_attn_type": fa_names.get(fa, fa),
            "type_k": "f32" if args.kv_f32 else "f16 (default)",
            "type_v": "f32" if args.kv_f32 else "f16 (default)",
        },
        "n_greedy": N_GREEDY,
        "prompt_set": args.prompt_set,
        "top_k": top_k,
        "round_decimals": ROUND,
        "chat_template_source": (
            " and ".join(sorted(chat_sources)) + " rendered with add_generation_prompt=True "
            "(a GGUF template by llama_cpp.llama_chat_format.Jinja2ChatFormatter); "
            "tokenized with parse_special=True"),
        "tf_greedy_agreement_overall": [all_agree, all_total],
        "notes": {
            "prompt_ids": "Llama.tokenize(text.encode('utf-8'), add_bos=True, "
                          "special=parse_special), i.e. llama_tokenize with "
                          "add_special=True (BOS/EOS added only if the GGUF vocab "
                          "asks; this model adds none) and parse_special only for "
                          "the chat prompt.",
            "greedy_ids": f"{N_GREEDY} tokens. Llama(logits_all=False): reset, "
                          "eval(prompt_ids) in one batch (logits for the last "
                          "token only), then repeatedly take np.argmax of "
                          "llama_get_logits_ith(ctx,-1) (lowest id on ties) and "
                          "eval([tok]) one token at a time. Generation does NOT "
                          "stop at EOS/EOG: an end token is recorded and decoding "
                          "continues, so there are always exactly n_greedy ids.",
            "greedy_text": "detokenize(greedy_ids, prev_tokens=prompt_ids, "
                           "special=True), invalid UTF-8 replaced; informational.",
            "positions": "Separate Llama(logits_all=True): reset, then "
                         "eval()/llama_decode of prompt_ids+greedy_ids in batches of "
                         "llama_params.n_batch tokens with logits for every token. positions[p] "
                         "(p = 0..len-1) holds the logits after token p, i.e. "
                         "predicting token p+1 (the last one predicts past the "
                         "sequence). top = top_k [token_id, logit] sorted by "
                         "logit descending (ties: lower id first); lse = "
                         "log-sum-exp of all n_vocab float32 logits computed in "
                         "float64. Logits and lse rounded to round_decimals.",
            "tf_greedy_agreement": "number of j in 0..n_greedy-1 where argmax of "
                                   "positions[len(prompt_ids)-1+j] (full, unrounded "
                                   "logits) equals greedy_ids[j]; batched and "
                                   "token-by-token llama.cpp evals differ slightly "
                                   "numerically, so near-ties may flip.",
            "tf_vs_stepwise_logit_diff": "max/mean |logit difference| over the "
                                         "full vocab between the token-by-token "
                                         "generation logits and the batched "
                                         "teacher-forced logits at the same "
                                         "n_greedy positions (llama.cpp's own "
                                         "evaluation-order noise).",
        },
    }

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    dump = lambda o: json.dumps(o, ensure_ascii=False, separators=(",", ":"))  # noqa: E731
    lines = ["{"]
    for k, v in header.items():
        lines.append(f"{json.dumps(k)}:{dump(v)},")
    lines.append('"prompts":[')
    lines.append(",\n".join(dump(r) for r in records))
    lines.append("]}")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size} bytes) in {time.time() - t0:.1f}s")

    # Verify the file round-trips.
    with open(args.out, encoding="utf-8") as f:
        data = json.load(f)
    assert len(data["prompts"]) == len(prompts)
    for r in data["prompts"]:
        assert len(r["greedy_ids"]) == N_GREEDY
        assert len(r["positions"]) == len(r["prompt_ids"]) + N_GREEDY
        assert all(len(p["top"]) == top_k for p in r["positions"])
    if rate < 0.9:
        print("WARNING: agreement rate below 0.9", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
