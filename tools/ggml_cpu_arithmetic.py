#!/usr/bin/env python3
"""Our engine against llama.cpp's reference with and without ggml's CPU arithmetic emulated
(tools/ggml_cpu_emulation.py): how much of the gap to llama.cpp is its own rounding.

For each emulation setting it runs the NumPy engine on the model and reports, against the
llama.cpp reference (tools/make_llamacpp_reference.py; default: the model's in tests/data),
what tests/test_llamacpp_parity.py measures: greedy 16-token continuations equal (and for each
mismatch the token where it leaves llama.cpp's and llama.cpp's top-2 logit gap there),
teacher-forced top-1 agreement, and the mean |delta log-prob| of the sequence's next token.

A setting is `none` (the engine's float32 arithmetic), `all`, or a comma list of parts:
q8 (product inputs quantized to the weight's vec_dot_type), kv16 (float16 KV cache, q and
softmax weights rounded to float16), gelu16 (GELU from ggml's float16 table).

    PYTHONPATH=. .venv/bin/python tools/ggml_cpu_arithmetic.py --model gemma3-270m \\
        --emulate none all q8 kv16 gelu16
    PYTHONPATH=. .venv/bin/python tools/ggml_cpu_arithmetic.py --prompts 3 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.ggml_cpu_emulation import PARTS, GgmlCpuBackend  # noqa: E402
from workers.engine.engine import Engine, Sequence  # noqa: E402
from workers.engine.sampling import SamplingParams, log_softmax  # noqa: E402
from workers.model import store  # noqa: E402

GREEDY_TOKENS = 16  # as tests/test_llamacpp_parity.py::test_greedy_generation_matches
REFERENCES = {"gemma3-270m": "llamacpp_reference_gemma3.json", store.DEFAULT_MODEL: "llamacpp_reference.json"}


def parts_of(setting: str) -> tuple[str, ...]:
    if setting == "none":
        return ()
    if setting == "all":
        return PARTS
    return tuple(setting.split(","))


def engine_for(model: Path, parts: tuple[str, ...]) -> Engine:
    """kv16 needs the float16 cache; every other setting keeps the engine's default (float32)."""
    return Engine(model, backend=GgmlCpuBackend(parts), kv_type="f16" if "kv16" in parts else None)


def greedy(engine: Engine, prompts: list[dict]) -> tuple[int, list[dict]]:
    """(prompts whose 16 greedy tokens equal llama.cpp's, the others' first difference)."""
    mismatches = []
    for p in prompts:
        params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
        got = [e.token_id for e in engine.generate(p["prompt_ids"], params)]
        want = p["greedy_ids"][:GREEDY_TOKENS]
        if got != want:
            j = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
            top = p["positions"][len(p["prompt_ids"]) - 1 + j]["top"]
            mismatches.append({"prompt": p["name"], "token": j, "ours": got[j], "llamacpp": want[j],
                               "llamacpp_top2_gap": round(top[0][1] - top[1][1], 4)})
    return len(prompts) - len(mismatches), mismatches


def teacher_forced(engine: Engine, prompts: list[dict]) -> dict:
    """Top-1 agreement and mean |delta log-prob| of the next token (where llama.cpp's top-k
    holds it) over every position of prompt + llama.cpp's continuation, one batched forward
    per prompt, as tests/test_llamacpp_parity.py::test_teacher_forced_logits_match."""
    agree = positions = 0
    next_diffs = []
    for p in prompts:
        ids = p["prompt_ids"] + p["greedy_ids"]
        seq = Sequence(ids)
        work = [(seq, len(ids))]
        try:
            engine.reserve(work)
            logits = engine.forward(work, all_logits=True)
        finally:
            engine.release(seq)
        for pos, (ref, ours) in enumerate(zip(p["positions"], logits)):
            ours_lp = log_softmax(ours)
            ref_top = {int(t): v for t, v in ref["top"]}
            positions += 1
            agree += int(np.argmax(ours)) == int(ref["top"][0][0])
            nxt = ids[pos + 1] if pos + 1 < len(ids) else None
            if nxt in ref_top:
                next_diffs.append(abs(ours_lp[nxt] - (ref_top[nxt] - ref["lse"])))
    return {"top1_agreement": agree / positions, "positions": positions,
            "mean_abs_dlogprob_next": float(np.mean(next_diffs)), "next_positions": len(next_diffs)}


def measure(model: Path, setting: str, prompts: list[dict]) -> dict:
    t0 = time.perf_counter()
    engine = engine_for(model, parts_of(setting))
    equal, mismatches = greedy(engine, prompts)
    row = {"setting": setting, "greedy_equal": equal, "prompts": len(prompts), "mismatches": mismatches,
           **teacher_forced(engine, prompts)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| emulation | greedy equal | top-1 agreement | mean abs dlogprob (next) | mismatches: prompt token (llama.cpp top-2 gap) |",
             "|---|---|---|---|---|"]
    for r in rows:
        miss = ", ".join(f"{m['prompt']} {m['token']} ({m['llamacpp_top2_gap']:.3f})" for m in r["mismatches"]) or "-"
        lines.append(f"| {r['setting']} | {r['greedy_equal']}/{r['prompts']} | {r['top1_agreement']:.4f} | "
                     f"{r['mean_abs_dlogprob_next']:.4f} | {miss} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--model", default=store.DEFAULT_MODEL, help=f"a registered model ({', '.join(REFERENCES)}) or a path")
    ap.add_argument("--reference", help="llama.cpp reference JSON (default: the model's in tests/data)")
    ap.add_argument("--emulate", nargs="+", default=["none", "all"],
                    help=f"settings to measure: none, all, or comma lists of {', '.join(PARTS)}")
    ap.add_argument("--prompts", type=int, help="the reference's first N prompts only")
    ap.add_argument("--json", action="store_true", help="one JSON object per setting instead of the table")
    args = ap.parse_args()

    if args.reference is None and args.model not in REFERENCES:
        ap.error(f"no default reference for {args.model!r}: pass --reference")
    for setting in args.emulate:
        unknown = set(parts_of(setting)) - set(PARTS)
        if unknown:
            ap.error(f"--emulate {setting}: unknown parts {sorted(unknown)}")
    reference = json.loads(Path(args.reference or REPO / "tests" / "data" / REFERENCES[args.model]).read_text())
    prompts = reference["prompts"][: args.prompts]
    model = store.resolve(args.model)

    rows = []
    for setting in args.emulate:
        rows.append(measure(model, setting, prompts))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
        else:
            print(f"{setting}: done in {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    if not args.json:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
