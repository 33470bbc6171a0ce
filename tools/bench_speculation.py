#!/usr/bin/env python3
"""Self-speculative greedy decoding on a real model: tokens per verifying pass by drafter, and
decode tok/s with speculation against without, on tools/data/speculation_prompts.json.

    PYTHONPATH=. python tools/bench_speculation.py [--model M] [--backend numpy|cupy]
        [--configs plain,lookup:4,early-exit:3:6,skip:3:12,auto:auto] [--skip-set FILE]
        [--tokens-code 48 --tokens-prose 32] [--temperature 0.7] [--vram-gb G [--resident draft|first]
        [--n-buffers N]] [--inside-refills] [--timeline] [--json OUT]
    PYTHONPATH=. python tools/bench_speculation.py --matmul   # the CPU's product cost by rows
    PYTHONPATH=. python tools/bench_speculation.py --pass-cost 20 [--backend cupy] [--vram-gb G]
    PYTHONPATH=. python tools/bench_speculation.py --sample-cost 50 [--model gemma3-270m]   # the host's share of a sampled pass
    PYTHONPATH=. python tools/bench_speculation.py --batch 4 [--configs ...]   # through the serving scheduler

A config is plain or DRAFTER:K[:N]: K drafted tokens (auto: chosen per pass, plain steps
included), DRAFTER lookup, early-exit (N layers run), skip (the first N layers of --skip-set's
calibration order passed over; without N its chosen set) or auto (among lookup, early exit
after a quarter of the layers, and --skip-set's set); DRAFTER+tree or DRAFTER-tree: the
model drafts' passes always or never verify draft trees (a leaf for the runner-up at each
drafted position; without either, where the policy expects them to pay). Code prompts are
raw completions, prose prompts chat messages; every config decodes every prompt greedily and
its tokens are compared with plain decoding (a mismatch is counted and printed with plain
decoding's top-2 logit gap where it first differs, and counted again if below NEAR_TIE; with
--temperature, tokens are drawn with the prompt's index as seed and not compared). Decode
tok/s is the generated tokens after the first over the time after the prefill, summed over
the set. --pass-cost REPS only times a verifying pass against a decode step (pass_cost): what
draft_policy.VERIFY_COST is taken from; --sample-cost REPS the host's sampling work per row of
a sampled pass (sample_cost): draft_policy.SAMPLE_SECONDS_PER_LOGIT. --batch B serves each
set's prompts B at a time through the serving scheduler (workers/engine/scheduler.py, driven
as the ComputeWorker drives it), each request with its own policy, max(16, B) rows of logits a
step (served): decode tok/s is then every token of the steps without a prompt chunk over their
time, and the tokens are compared with the plain batch's. --warm-up N first runs each config on a set's first N prompts untimed
(default: 4 on a GPU backend, 0 on the CPU): a GPU engine captures a decode graph for each
shape it meets (batch rows, block-table width) the first time, as a server does once in its
life, and a config that uses more shapes (adaptive k) would otherwise pay more of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, deque
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.draft_policy import DraftMemory, DraftPolicy  # noqa: E402
from workers.engine.engine import Engine, Sequence  # noqa: E402
from workers.engine.sampling import SamplingParams  # noqa: E402
from workers.engine.scheduler import Scheduler  # noqa: E402
from workers.engine.skip_calibration import load_skip_set, residency_order  # noqa: E402
from workers.engine.speculation import MAX_K, Speculation  # noqa: E402
from workers.model import store as model_store  # noqa: E402


def parse_config(text: str, skip_set: str | None, n_layers: int) -> Speculation | None:
    if text == "plain":
        return None
    name, k, *arg = text.split(":")
    tree = {"+": True, "-": False}.get(name[-5:-4]) if name.endswith("tree") else None
    name = name[:-5] if tree is not None else name
    k = None if k == "auto" else int(k)
    n = int(arg[0]) if arg else None
    if name == "early-exit":
        return Speculation(k, name, depth=n, tree=tree)
    skip = load_skip_set(skip_set, n_layers, n) if skip_set and name in ("skip", "auto") else None
    return Speculation(k, name, skip=skip, tree=tree)


NEAR_TIE = 1e-3  # issue 15: a difference from plain decoding is allowed where plain's top-2 gap is below this


def plain_gap(engine: Engine, ids: list[int], params: SamplingParams, j: int) -> float:
    """Plain decoding's top-2 log-prob (= logit) gap at its generated token j: where a
    speculative run first leaves it, how near a tie that token was."""
    top = list(engine.generate(ids, replace(params, max_tokens=j + 1, logprobs=2)))[j].top_logprobs
    return top[0][1] - top[1][1]


def report_difference(engine: Engine, set_name: str, i: int, config: str, ids: list[int], params: SamplingParams,
                      out: list[int], plain: list[int]) -> bool:
    """Print where a greedy speculative run first leaves plain decoding and plain's top-2 gap
    there (untimed: called after the timings); -> whether that is a near tie."""
    # the first token that differs; where one run is a prefix of the other (it stopped
    # earlier), the first token only one of them has; no gap where plain has no token j
    j = next((j for j, (a, b) in enumerate(zip(out, plain)) if a != b), min(len(out), len(plain)))
    gap = plain_gap(engine, ids, params, j) if j < len(plain) else float("nan")
    print(f"  {set_name} prompt {i}: {config} differs from plain decoding at token {j}, where "
          f"plain's top-2 gap is {gap:.2e}", flush=True)
    return gap < NEAR_TIE


def matmul_rows() -> None:
    """What a verifying pass's products cost the NumPy backend against a decode step's: x [M, 896]
    against the default model's output head (151,936 x 896 float32), M = 1 (a step) to 17 (k =
    16), as the backend multiplies (one GEMV a row up to numpy_backend.GEMV_ROWS) and as one
    OpenBLAS GEMM. The best of 3 after one untimed run."""
    import time

    from kernels.numpy_backend import NumpyBackend

    ops = NumpyBackend()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((151936, 896)).astype(np.float32)

    def best(f) -> float:
        f()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    print("| M | backend ms | GB/s of weights | GEMM ms |\n|---:|---:|---:|---:|")
    for m in (1, 2, 3, 5, 9, 13, 17):
        x = rng.standard_normal((m, 896)).astype(np.float32)
        ours, gemm = best(lambda: ops.matmul(x, w)), best(lambda: x @ w.T)
        print(f"| {m} | {ours * 1e3:.1f} | {w.nbytes / ours / 1e9:.1f} | {gemm * 1e3:.1f} |", flush=True)


def pass_cost(engine: Engine, reps: int, context: int = 200) -> None:
    """A verifying pass of k + 1 tokens against a plain decode step (every row's logits to the
    host, as verify takes them), after `context` cached tokens: as decode rows (what verify
    runs: on the GPU the decode graph of batch k + 1) and as one query range (the earlier,
    prefill-shaped pass). The median of reps timings after one untimed run (which captures
    the GPU's graphs)."""
    import time

    ids = np.random.default_rng(0).integers(100, engine.config.vocab_size // 2, context + MAX_K + 1).tolist()
    seq = Sequence(ids)
    engine.reserve([(seq, len(ids))])
    engine.forward([(seq, context)])

    def timed(n: int, decode_rows: bool) -> float:
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            engine.forward([(seq, n)], all_logits=True, decode_rows=decode_rows)
            times.append(time.perf_counter() - t0)
            seq.num_cached -= n
        return float(np.median(times[1:]))

    try:
        step = timed(1, False)
        print(f"decode step: {step * 1e3:.2f} ms ({engine.ops.name})")
        print("| k | decode rows ms | in steps | one range ms | in steps |\n|---:|---:|---:|---:|---:|")
        for k in (1, 2, 4, 8, 16):
            rows, ranges = timed(k + 1, True), timed(k + 1, False)
            print(f"| {k} | {rows * 1e3:.2f} | {rows / step:.2f} | {ranges * 1e3:.2f} | {ranges / step:.2f} |",
                  flush=True)
    finally:
        engine.release(seq)


def sample_cost(vocab: int, temperature: float, reps: int) -> None:
    """The host's time for the work a sampled verifying pass does per row of logits, what
    draft_policy.SAMPLE_SECONDS_PER_LOGIT is taken from: the distribution a row's token is
    drawn from (`Sampler.distribution`) and a draw from one (`draw`, as accept_sampled draws),
    over a row of `vocab` logits (normal, scaled as a model's: std 3). The median of reps."""
    import time

    from kernels.numpy_backend import draw
    from workers.engine.sampling import Sampler

    sampler = Sampler(SamplingParams(temperature=temperature, seed=0))
    row = (np.random.default_rng(0).standard_normal(vocab) * 3).astype(np.float32)

    def timed(f) -> float:
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return float(np.median(times[1:]))

    p = sampler.distribution(row)
    dist, drawn = timed(lambda: sampler.distribution(row)), timed(lambda: draw(p, sampler.rng.random()))
    print(json.dumps({"vocab": vocab, "temperature": temperature, "distribution_ms": round(dist * 1e3, 3),
                      "draw_ms": round(drawn * 1e3, 3), "distribution_s_per_logit": dist / vocab,
                      "draw_s_per_logit": drawn / vocab}))


class Timeline:
    """--timeline (cupy): CUDA events around each draft chain (`ops.greedy_chain`), each plain
    greedy step and each forward (`ops.run_step`: a prompt's, a verifying pass's), read after
    each request. For each verifying pass right after a draft: the draft, the time from its
    end to the pass's start, the pass, and (after a verifying pass) the time from that pass's
    end to the draft's start; for a pass right after another (a lookup draft, the host's) but
    the request's first: the time between the two and the pass. A span begins when the stream
    reaches it: where the GPU was still busy, where that work ended; where it idled, when the
    host issued it. So the gaps are the GPU's waits for the host. The events cost each pass ~6
    records of host time."""

    PARTS = ("idle before the draft", "draft", "draft to pass", "pass", "idle before a host-drafted pass",
             "host-drafted pass")

    def __init__(self, engine: Engine):
        import cupy as cp

        self.cp, self.inside = cp, False
        self.reset()
        ops = engine.ops
        for name, kind in (("greedy_chain", "draft"), ("greedy_step", "plain"), ("run_step", "pass")):
            setattr(ops, name, self._marked(ops, getattr(ops, name), kind))

    def _marked(self, ops, inner, kind: str):
        def marked(*args, **kwargs):
            if self.inside:  # a call the marked one makes (a NumPy chain's steps)
                return inner(*args, **kwargs)
            start, end = self.cp.cuda.Event(), self.cp.cuda.Event()
            start.record(ops.stream)
            self.inside = True
            try:
                out = inner(*args, **kwargs)
            finally:
                self.inside = False
            end.record(ops.stream)
            self.marks.append((kind, start, end))
            return out

        return marked

    def reset(self) -> None:
        """Sums from zero (a config's timed requests)."""
        self.start()
        self.sums, self.counts = dict.fromkeys(self.PARTS, 0.0), dict.fromkeys(self.PARTS, 0)

    def start(self) -> None:
        """Marks from here (what ran since, untimed, left out)."""
        self.marks = []

    def take(self) -> None:
        """The spans since start(), added to the sums."""
        marks, self.marks = self.marks, []
        if not marks:
            return
        marks[-1][2].synchronize()
        ms = self.cp.cuda.get_elapsed_time
        for i in range(1, len(marks)):
            (kind0, start0, end0), (kind1, start1, end1) = marks[i - 1], marks[i]
            if (kind0, kind1) == ("pass", "pass") and i >= 2:  # the first pair: a prompt, then a pass
                spans = {"idle before a host-drafted pass": ms(end0, start1), "host-drafted pass": ms(start1, end1)}
            elif (kind0, kind1) == ("draft", "pass"):
                spans = {"draft": ms(start0, end0), "draft to pass": ms(end0, start1), "pass": ms(start1, end1)}
                if i >= 3 and (marks[i - 3][0], marks[i - 2][0]) == ("draft", "pass"):
                    spans["idle before the draft"] = ms(marks[i - 2][2], start0)
            else:
                continue
            for part, t in spans.items():
                self.sums[part] += t
                self.counts[part] += 1

    def means(self) -> dict[str, float]:
        """Each part's mean ms over the passes that have it."""
        return {part: self.sums[part] / self.counts[part] for part in self.PARTS if self.counts[part]}


def served(engine: Engine, ids_list: list[list[int]], params: SamplingParams, spec, batch: int):
    """The prompts B at a time through a Scheduler, launched until its depth is in flight and
    committed oldest first (ComputeWorker._run). -> ({prompt index: ids}, decode tokens, their
    seconds: the steps without a prompt chunk, each the time from the previous commit to its
    own, Stats)."""
    out: dict[int, list[int]] = {}
    tokens, seconds = 0, 0.0
    sched = Scheduler(engine, max_num_seqs=engine.max_logit_rows, max_batch_tokens=512, speculation=spec)
    for start in range(0, len(ids_list), batch):
        for i in range(start, min(start + batch, len(ids_list))):
            sched.submit(str(i), ids_list[i], params)
        launched: deque = deque()
        last = time.perf_counter()
        while sched.has_work or launched:
            if (step := sched.plan_next()) is not None:
                launched.append((step, sched.launch(step)))
                if len(launched) < sched.depth:
                    continue
            step, pending = launched.popleft()
            prompt = any(n > 1 for _, n in step.work)
            events = sched.commit(step, pending())
            now = time.perf_counter()
            if not prompt:
                tokens, seconds = tokens + len(events), seconds + now - last
            last = now
            for rid, event in events:
                out.setdefault(int(rid), []).append(event.token_id)
    return out, tokens, seconds, sched.spec_stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=model_store.DEFAULT_MODEL)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--configs", default="plain,lookup:4,early-exit:3:6")
    ap.add_argument("--tokens-code", type=int, default=48)
    ap.add_argument("--tokens-prose", type=int, default=32)
    ap.add_argument("--prompts", type=int, help="the first N prompts of each set (default: all)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--skip-set", help="a calibrate-skip JSON file (skip and auto configs)")
    ap.add_argument("--vram-gb", type=float, help="the engine's VRAM budget: the layers past it stream (GPU)")
    ap.add_argument("--resident", choices=("draft", "first"), default="draft",
                    help="with --vram-gb and --skip-set: the skip draft's layers stay resident (draft, as ntr generate "
                    "places them) or the first layers do (first)")
    ap.add_argument("--n-buffers", type=int, help="with --vram-gb: the VRAM slots streamed layers pass through")
    ap.add_argument("--inside-refills", action="store_true",
                    help="cupy: verifying passes refill the slots inside the pass (late_refills off), as before")
    ap.add_argument("--timeline", action="store_true",
                    help="cupy: each verifying pass's GPU time split into draft, pass and the gaps between (Timeline)")
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--batch", type=int, help="serve the prompts this many at a time through the scheduler (served)")
    ap.add_argument("--warm-up", type=int, metavar="N",
                    help="run each config on a set's first N prompts untimed first (default: 4 on cupy, 0 on numpy)")
    ap.add_argument("--matmul", action="store_true", help="only time the CPU's products by rows (matmul_rows)")
    ap.add_argument("--pass-cost", type=int, metavar="REPS",
                    help="only time a verifying pass against a decode step, REPS times each (pass_cost)")
    ap.add_argument("--sample-cost", type=int, metavar="REPS",
                    help="only time the host's sampling work a sampled pass does per row, REPS times (sample_cost)")
    args = ap.parse_args()
    if args.matmul:
        matmul_rows()
        return 0
    sets = json.loads((REPO / "tools" / "data" / "speculation_prompts.json").read_text())
    path = model_store.resolve(args.model)
    draft_resident = args.vram_gb and args.skip_set and args.resident == "draft"
    order = residency_order(args.skip_set, path) if draft_resident else None
    # --batch: the scheduler's max_num_seqs and the rows its passes fill, max(16, B)
    rows = {"max_logit_rows": max(16, args.batch)} if args.batch else {}
    engine = Engine(path, backend=args.backend, max_context=1024,
                    vram_budget=int(args.vram_gb * 2**30) if args.vram_gb else None, resident_order=order,
                    n_buffers=args.n_buffers, **rows)
    if args.inside_refills:
        engine.ops.tuning.late_refills = False
    print(json.dumps({"tiers": engine.placement.tiers, "slots": engine.placement.n_buffers}), flush=True)
    timeline = Timeline(engine) if args.timeline else None
    if args.pass_cost:
        pass_cost(engine, args.pass_cost)
        return 0
    if args.sample_cost:
        sample_cost(engine.config.vocab_size, args.temperature or 0.7, args.sample_cost)
        return 0
    prompts = {"code": [engine.prompt_ids(p) for p in sets["code"][:args.prompts]],
               "prose": [engine.chat_prompt_ids([{"role": "user", "content": p}]) for p in sets["prose"][:args.prompts]]}
    tokens = {"code": args.tokens_code, "prose": args.tokens_prose}
    warm_up = args.warm_up if args.warm_up is not None else (0 if args.backend == "numpy" else 4)
    rows, plain_ids = [], {}
    for set_name, ids_list in prompts.items():
        for config in args.configs.split(","):
            spec = parse_config(config, args.skip_set, engine.config.n_layers)
            decode_tokens = decode_s = passes = accepted = drafted = mismatches = near_ties = plain_steps = 0
            leaves = leaf_hits = 0
            choices = Counter()
            # each request's parameters: the batch's greedy, or the prompt's own seed
            batch_params = SamplingParams(max_tokens=tokens[set_name], temperature=0.0, ignore_eos=True)

            def single_params(i: int) -> SamplingParams:
                return SamplingParams(max_tokens=tokens[set_name], temperature=args.temperature, seed=i,
                                      ignore_eos=True)

            # each config from a fresh memory (Engine.draft_memory: what earlier greedy requests
            # measured), then untimed first: the graphs of the shapes this config meets, and the
            # memory's first lessons, as on a server that has run a while
            engine.draft_memory = DraftMemory()
            if args.batch and warm_up:
                served(engine, ids_list[:warm_up], batch_params, spec, args.batch)
            for i, ids in enumerate([] if args.batch else ids_list[:warm_up]):
                list(engine.generate(ids, single_params(i), spec))
            if timeline is not None:
                timeline.reset()  # the warm-up's requests left out
            if args.batch:
                if timeline is not None:
                    timeline.start()
                out, decode_tokens, decode_s, s = served(engine, ids_list, batch_params, spec, args.batch)
                if timeline is not None:
                    timeline.take()
                passes, accepted, drafted = s.passes, s.accepted, s.drafted
                plain_steps, choices, leaves, leaf_hits = s.plain_steps, s.choices, s.leaves, s.leaf_hits
                if spec is None:
                    plain_ids.update({(set_name, i): ids for i, ids in out.items()})
                else:
                    for i in sorted(out):
                        if (set_name, i) in plain_ids and out[i] != plain_ids[(set_name, i)]:
                            mismatches += 1
                            near_ties += report_difference(engine, set_name, i, config, ids_list[i], batch_params,
                                                           out[i], plain_ids[(set_name, i)])
            for i, ids in enumerate([] if args.batch else ids_list):
                params = single_params(i)
                if timeline is not None:
                    timeline.start()
                out = [e.token_id for e in engine.generate(ids, params, spec)]
                if timeline is not None:
                    timeline.take()
                t, s = engine.last_timings, engine.last_speculation
                decode_tokens += t.decode_tokens
                decode_s += t.decode_s
                passes, accepted, drafted = passes + s.passes, accepted + s.accepted, drafted + s.drafted
                plain_steps += s.plain_steps
                leaves, leaf_hits = leaves + s.leaves, leaf_hits + s.leaf_hits
                choices.update(s.choices)
                if spec is None:
                    plain_ids[(set_name, i)] = out
                elif args.temperature == 0 and (set_name, i) in plain_ids and out != plain_ids[(set_name, i)]:
                    mismatches += 1
                    near_ties += report_difference(engine, set_name, i, config, ids, params, out,
                                                   plain_ids[(set_name, i)])
            row = {"set": set_name, "config": config, "temperature": args.temperature,
                   "decode_tok_s": decode_tokens / decode_s,
                   "tokens_per_pass": (accepted + passes) / passes if passes else 1.0,
                   "acceptance": accepted / drafted if drafted else None, "mismatches": mismatches,
                   "mismatches_at_near_ties": near_ties,
                   "plain_steps": plain_steps, "passes": passes, "leaves": leaves, "leaf_hits": leaf_hits,
                   "choices": {f"{d}:{k}": n for (d, k), n in sorted(choices.items())},
                   "prompts": len(ids_list), "tokens": tokens[set_name], "batch": args.batch or 1}
            if spec is not None:  # what the policy weighs passes with, in plain steps (null: it never drafts)
                policy = DraftPolicy.for_engine(engine, spec, greedy=not args.temperature)
                row["policy_costs"] = policy and {"draft": policy.draft_cost, "lookup_host": policy.host_cost,
                                                  "sampling": policy.sample_cost}
            if timeline is not None:
                row["timeline_ms"] = timeline.means()
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["set"]: r["decode_tok_s"] for r in rows if r["config"] == "plain"}
    print("\n| set | config | batch | tokens a pass | acceptance | leaves kept | passes / plain steps | decode tok/s | "
          "vs plain | differs from plain (at a near tie) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        ratio = r["decode_tok_s"] / base[r["set"]] if r["set"] in base else float("nan")
        kept = f"{r['leaf_hits']} / {r['leaves']}" if r["leaves"] else ""
        print(f"| {r['set']} | {r['config']} | {r['batch']} | {r['tokens_per_pass']:.2f} | {acc} | {kept} | "
              f"{r['passes']} / {r['plain_steps']} | "
              f"{r['decode_tok_s']:.2f} | "
              f"{ratio:.2f}x | {r['mismatches']} of {r['prompts']} ({r['mismatches_at_near_ties']}) |")
    if timeline is not None:
        print("\n| set | config | " + " | ".join(f"{part} ms" for part in Timeline.PARTS) + " |")
        print("|---|---|" + "---:|" * len(Timeline.PARTS))
        for r in rows:
            t = r["timeline_ms"]
            print(f"| {r['set']} | {r['config']} | " + " | ".join(f"{t[p]:.3f}" if p in t else "" for p in Timeline.PARTS)
                  + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
