#!/usr/bin/env python3
"""Our greedy 16-token continuations against one or more llama.cpp references
(tools/make_llamacpp_reference.py files of the same prompts), and the references against each
other: where each pair first differs, and llama.cpp's top-2 logit gap there.

    .venv/bin/python tools/compare_greedy.py --model gemma3-270m \\
        tests/data/llamacpp_reference_gemma3.json tests/data/llamacpp_reference_gemma3_kvf32.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine.engine import Engine  # noqa: E402
from workers.engine.sampling import SamplingParams  # noqa: E402
from workers.model import store  # noqa: E402

TOKENS = 16


def first_difference(got: list[int], prompt: dict) -> dict:
    want = prompt["greedy_ids"][:TOKENS]
    j = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if j is None:
        return {"equal": True}
    top = prompt["positions"][len(prompt["prompt_ids"]) - 1 + j]["top"]
    return {"equal": False, "token": j, "llamacpp_top2_gap": round(top[0][1] - top[1][1], 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("references", nargs="+")
    args = ap.parse_args()
    refs = {Path(r).name: json.loads(Path(r).read_text())["prompts"] for r in args.references}
    names = list(refs)
    engine = Engine(store.pull(args.model), backend="numpy")
    equal = dict.fromkeys(names, 0)
    for i, prompt in enumerate(refs[names[0]]):
        if any(refs[n][i]["prompt_ids"] != prompt["prompt_ids"] for n in names):
            raise SystemExit(f"{prompt['name']}: the references tokenize the prompt differently")
        params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
        got = [e.token_id for e in engine.generate(prompt["prompt_ids"], params)]
        row = {"prompt": prompt["name"]}
        for n in names:
            row[n] = first_difference(got, refs[n][i])
            equal[n] += row[n]["equal"]
        for n in names[1:]:
            row[f"{names[0]} vs {n}"] = first_difference(refs[names[0]][i]["greedy_ids"][:TOKENS], refs[n][i])
        print(json.dumps(row), flush=True)
    print(json.dumps({"prompts": len(refs[names[0]]), "ours_equal": equal}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
