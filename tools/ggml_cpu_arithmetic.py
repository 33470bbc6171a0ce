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
        --emulate none all q8 kv16 gelu16 [--nudge]
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
NUDGE = np.float32(1 + 2**-22)  # --nudge: every embedding row scaled by about two float32 ulps
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


def forced_logits(engine: Engine, p: dict) -> np.ndarray:
    """Logits at every position of prompt + llama.cpp's continuation, one batched forward."""
    seq = Sequence(p["prompt_ids"] + p["greedy_ids"])
    work = [(seq, len(seq.token_ids))]
    try:
        engine.reserve(work)
        return np.asarray(engine.forward(work, all_logits=True))
    finally:
        engine.release(seq)


def nudged_change(engine: Engine, prompts: list[dict], logits: list[np.ndarray]) -> float:
    """How chaotic the arithmetic is: with every embedding row scaled by NUDGE, the largest
    |logit change| of each position, averaged over the positions."""
    embedding = engine.ops.embedding
    engine.ops.embedding = lambda table, step: embedding(table, step) * NUDGE
    try:
        return float(np.mean(np.concatenate([np.abs(forced_logits(engine, p) - before).max(-1)
                                             for p, before in zip(prompts, logits)])))
    finally:
        del engine.ops.embedding  # the backend's own method again


def teacher_forced(prompts: list[dict], logits: list[np.ndarray]) -> dict:
    """Top-1 agreement and mean |delta log-prob| of the next token (where llama.cpp's top-k
    holds it) over every position of prompt + llama.cpp's continuation (forced_logits), as
    tests/test_llamacpp_parity.py::test_teacher_forced_logits_match."""
    agree = positions = 0
    next_diffs = []
    for p, prompt_logits in zip(prompts, logits):
        ids = p["prompt_ids"] + p["greedy_ids"]
        for pos, (ref, ours) in enumerate(zip(p["positions"], prompt_logits)):
            ours_lp = log_softmax(ours)
            ref_top = {int(t): v for t, v in ref["top"]}
            positions += 1
            agree += int(np.argmax(ours)) == int(ref["top"][0][0])
            nxt = ids[pos + 1] if pos + 1 < len(ids) else None
            if nxt in ref_top:
                next_diffs.append(abs(ours_lp[nxt] - (ref_top[nxt] - ref["lse"])))
    return {"top1_agreement": agree / positions, "positions": positions,
            "mean_abs_dlogprob_next": float(np.mean(next_diffs)), "next_positions": len(next_diffs)}


def measure(model: Path, setting: str, prompts: list[dict], nudge: bool) -> dict:
    t0 = time.perf_counter()
    engine = engine_for(model, parts_of(setting))
    equal, mismatches = greedy(engine, prompts)
    logits = [forced_logits(engine, p) for p in prompts]
    row = {"setting": setting, "greedy_equal": equal, "prompts": len(prompts), "mismatches": mismatches,
           **teacher_forced(prompts, logits)}
    if nudge:
        row["nudged_logit_change"] = nudged_change(engine, prompts, logits)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    nudge = all("nudged_logit_change" in r for r in rows)
    lines = ["| emulation | greedy equal | top-1 agreement | mean abs dlogprob (next) | "
             + ("logit change, embeddings x (1 + 2^-22) | " if nudge else "")
             + "mismatches: prompt token (llama.cpp top-2 gap) |",
             "|---|---|---|---|---|" + ("---|" if nudge else "")]
    for r in rows:
        miss = ", ".join(f"{m['prompt']} {m['token']} ({m['llamacpp_top2_gap']:.3f})" for m in r["mismatches"]) or "-"
        lines.append(f"| {r['setting']} | {r['greedy_equal']}/{r['prompts']} | {r['top1_agreement']:.4f} | "
                     f"{r['mean_abs_dlogprob_next']:.4f} | "
                     + (f"{r['nudged_logit_change']:.2e} | " if nudge else "") + f"{miss} |")
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
    ap.add_argument("--nudge", action="store_true",
                    help="also the mean over positions of the largest logit change when every embedding row is "
                         "scaled by 1 + 2^-22 (how chaotic each setting's arithmetic is)")
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
        rows.append(measure(model, setting, prompts, args.nudge))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
        else:
            print(f"{setting}: done in {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    if not args.json:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
