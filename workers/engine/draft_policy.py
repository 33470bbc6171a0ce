"""Adaptive speculation: which drafter, and how many tokens, each pass of one sequence drafts,
from the acceptance that sequence has measured (`--speculate auto`, `--drafter auto`).

The rule. Each drafter d has a per-token acceptance estimate a_d = (hits + PRIOR) / (hits +
misses + 2 PRIOR): a pass that drafted n tokens and kept m adds m hits and, if m < n or n = 0,
one miss (a draft is kept up to its first rejection, so this is the geometric model's
estimate), both decayed by DECAY a pass so the estimate follows the sequence. The counts settle
at 1 / (1 - DECAY) passes' worth, so no estimate falls below PRIOR / (1 / (1 - DECAY) + 2 PRIOR):
with 0.8 and 1 that floor was 1/7, at which a draft through one resident layer that kept 1% of
its proposals still looked worth a pass, and the policy drafted 898 of 918 passes at 0.89x of
plain decoding (docs/benchmarks.md, "Item 3 at budgets where the draft's layers stream too");
with 0.9 and 1/2 it is 1/22. A pass of d with k tokens is
expected to give (1 - a^(k+1)) / (1 - a) tokens and to cost, in plain decode steps,
verify_cost(k) (a pass over k + 1 rows, interpolated between the measured ones; 1 when nothing
was drafted) + k * draft_cost(d), where draft_cost is the placement's predicted time of a pass
through the drafter's layers and the head over a whole step's (0 for lookup): about the share
of the weights they hold when every layer is resident, far less when the draft's layers are
resident and others stream; a lookup pass also costs host_cost, the host time a GPU waits for
while the host searches the context and builds the pass (a model draft's chain runs on the
device meanwhile, so the host builds its pass unwaited for). A sampled request's pass also
costs the host's rejection sampling (`speculation.accept_sampled`): a distribution over the
vocabulary for each row it reads and for each token a model draft draws, and a draw from one
for each of those draws and the pass's last token (on the GPU, whose plain steps draw on the
device; the CPU samples a plain step on the host as well, and its steps are long beside it).
In a step of B decodes, the plain step already gives B tokens for its cost, and a pass makes
all B wait for it: the pass is worth (B - 1 + tokens) / (B * cost) plain steps (at B = 1,
tokens / cost), so the same acceptance pays less in a batch (the scheduler's batch of 4 streamed, skip 12 at k=3: 1,277
tok/s against plain's 1,745 on the H200). The next pass takes the (d, k) with the most worth
(ties: the earlier drafter in DRAFTERS order, then the smaller k). With a fixed k only d is
chosen; with auto k, when no (d, k) beats a plain step (worth at most 1) the step is plain,
and after PROBE_FIRST plain steps in a row the best (d, k) drafts once anyway to refresh its
estimate, the wait doubling (to PROBE_MAX) while probes do not pay. Where no pass would beat a
plain step even if every proposal were kept (a sampled request on a small model on the GPU,
where the host's sampling of a pass costs several steps), the request does not speculate at
all (`for_engine` gives None): probing could only lose. Nothing here reads a clock or a random
number.

One serves one request: `Engine.generate` makes one, and the serving scheduler one for each
request it runs speculatively (workers/engine/scheduler.py). A greedy request starts from what
the engine's last finished greedy request left (`DraftMemory`: its estimates, its wait before
a probe and the plain steps counted toward it), not from 1/2 each: a request of 48 tokens is
over before its own estimates settle, and two probes of drafters that never pay cost a resident
model 8% of its decode. The count goes on across requests because a wait of 64 is longer than
many requests: counted from zero in each, it never ended, and the policy never tried a drafter
again once its estimate had dipped (1.50 GiB, docs/benchmarks.md). A sampled
request starts from the priors, so that its seed reproduces its choices and with them its
draws; a greedy request's tokens do not depend on its choices.
"""

from __future__ import annotations

import numpy as np

from workers.engine.speculation import MAX_K, Choice, Speculation

# A verifying pass of k + 1 rows, in decode steps of the same backend and placement, by k, as
# `tools/bench_speculation.py --pass-cost` measures it. numpy: the default model on the 2-core
# development machine, a pass's products one GEMV a row (numpy_backend.GEMV_ROWS), 2026-12-05
# with numpy 2.4.6 (a 33.5 ms step; the same machine's earlier 62-70 ms steps gave 1.47-4.02).
# cupy: the pass as decode rows replaying the decode graph of batch k + 1, the real default
# model on the H200, 2026-12-05: resident (a 0.77 ms step), and streamed at --vram-gb 1.66, 11
# layers through 2 slots (a 2.68 ms step, the link's). A constant cost misled the policy: free
# lookup drafts then always took k = 16, whose pass costs 1.3-2.7x a pass of k = 1.
VERIFY_COST = {
    ("numpy", False): {1: 1.67, 2: 2.13, 4: 2.79, 8: 4.17, 16: 5.23},
    ("cupy", False): {1: 1.99, 2: 2.04, 4: 2.17, 8: 2.50, 16: 3.04},
    ("cupy", True): {1: 1.07, 2: 1.13, 4: 1.14, 8: 1.25, 16: 1.44},
}
VERIFY_COST["numpy", True] = VERIFY_COST["numpy", False]  # the CPU streams nothing
# A lookup pass's host time that the device waits for: from the last pass's end to this one's
# start, settling it, the n-gram search and the pass's plan and upload, which a model draft's
# device chain hides (its pass is built while the draft computes). cupy: the device idles
# 0.12-0.15 ms before each lookup pass of Engine.generate (`bench_speculation.py --timeline`,
# H100, 2026-12-06) and ~0.2-0.28 ms through the serving scheduler, which also commits and plans
# between passes (its lookup passes' time against VERIFY_COST's; docs/benchmarks.md). numpy:
# the CPU waits for every pass alike, and 0.2 ms is <1% of its step.
HOST_DRAFT_SECONDS = {"numpy": 0.0, "cupy": 0.2e-3}
# The host's sampling work in a sampled pass, per logit of a row: (a row's distribution, a draw
# from one). cupy: `tools/bench_speculation.py --sample-cost 50` on the 2-core development
# machine, 2026-12-07, gives 4.0 and 2.7 ns (0.6 and 0.4 ms a row of Qwen's 151,936 logits);
# the distribution's figure is the GPU runs' instead: Gemma 3 270M's sampled lookup passes on
# the H100 (2026-12-05: 7.8 ms a pass of 1.64 tokens, against 2.1 ms for its rows on the
# device) leave ~2.3 ms a row read, ~8.8 ns a logit, its copy to the host included. numpy:
# none counted, as HOST_DRAFT_SECONDS: a plain step samples on the host too, and a pass's few
# rows more are ~1 ms beside the default model's 33-70 ms step.
SAMPLE_SECONDS_PER_LOGIT = {"numpy": (0.0, 0.0), "cupy": (8.8e-9, 2.7e-9)}
DECAY, PRIOR = 0.9, 0.5
PROBE_FIRST, PROBE_MAX = 8, 64


def estimate(hits: float, misses: float) -> float:
    """A rate from decayed counts, pulled toward 1/2 by PRIOR of each."""
    return (hits + PRIOR) / (hits + misses + 2.0 * PRIOR)


def expected_tokens(a: float, k: int) -> float:
    """Tokens a pass of k drafts gives when each is kept with probability a after the previous."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


class DraftPolicy:
    def __init__(self, spec: Speculation, drafters: dict[str, tuple[int, ...] | None], draft_cost: dict[str, float],
                 verify_cost: dict[int, float], trees: bool = False, host_cost: float = 0.0,
                 sample_cost: tuple[float, float] = (0.0, 0.0)):
        """drafters: `spec.drafters(...)`; draft_cost: each one's cost per drafted token in
        decode steps; verify_cost: a verifying pass's in decode steps, by k (measured points);
        trees: whether the model drafters' passes may be trees (a greedy request on an engine
        that `verifies_trees`), as spec.tree allows (None: where they pay); host_cost: a lookup
        pass's host time the device waits for, in decode steps; sample_cost: a sampled
        request's host work, in decode steps, for one distribution and for one draw (greedy:
        none)."""
        self.k = spec.k
        self.ks = [spec.k] if spec.k is not None else range(1, MAX_K + 1)  # the k a pass may take
        self.drafters = drafters
        self.host_cost = host_cost
        self.sample_cost = sample_cost
        allowed = (False, True) if spec.tree is None else (spec.tree,)
        self.tree_options = {d: allowed if trees and layers is not None else (False,) for d, layers in drafters.items()}
        self.draft_cost = draft_cost
        # by the drafted tokens a pass's rows stand for (a tree of k: 2k), interpolated between
        # the measured points and past the last one along the last segment's slope
        ks = sorted(verify_cost)
        costs = [verify_cost[k] for k in ks]
        slope = (costs[-1] - costs[-2]) / (ks[-1] - ks[-2]) if len(ks) > 1 else 0.0
        self.verify_cost = {k: float(np.interp(k, ks, costs)) + slope * max(0, k - ks[-1])
                            for k in range(1, 2 * MAX_K + 1)}
        self.hits = dict.fromkeys(self.drafters, 0.0)
        self.misses = dict.fromkeys(self.drafters, 0.0)
        self.leaf_hits = dict.fromkeys(self.drafters, 0.0)  # trees: leaves that held the model's token
        self.leaf_misses = dict.fromkeys(self.drafters, 0.0)
        self.plain_run, self.probe_after = 0, PROBE_FIRST
        self._best_pass: dict[int, tuple[float, str, int, bool]] = {}  # _best's by batch, until the next update
        self.memory: DraftMemory | None = None  # a greedy request's: where it started, and leaves what it measured

    @classmethod
    def for_engine(cls, engine, spec: Speculation, greedy: bool = True) -> "DraftPolicy":
        """A draft token's cost: the placement's predicted time for a pass through its layers
        and the head over a whole step's (`Engine.pass_seconds`: resident layers read, streamed
        ones copied too), so a draft through resident layers is cheap beside a streamed step.
        A verifying pass's: VERIFY_COST of the backend and placement. Through pipeline stages
        every pass, a draft's step as a plain one, also pays the runner's overhead
        (`Engine.pass_overhead_seconds`), which the one-process chain of draft steps does not:
        it adds to each of the three before they are put in steps. A lookup pass's host time:
        HOST_DRAFT_SECONDS over the step; a sampled pass's sampling: SAMPLE_SECONDS_PER_LOGIT
        times the vocabulary, over the step. None where no pass could beat a plain step with
        every proposal kept (k auto): the request decodes plainly. A greedy request's policy
        starts from the engine's `draft_memory`."""
        drafters = engine.drafters(spec)
        alone, over = engine.pass_seconds(), engine.pass_overhead_seconds
        step = alone + over
        costs = {name: 0.0 if layers is None else (engine.pass_seconds(layers) + over) / step
                 for name, layers in drafters.items()}
        verify = {k: (c * alone + over) / step for k, c in VERIFY_COST[engine.ops.name, engine.streams].items()}
        sample = (0.0, 0.0) if greedy else tuple(s * engine.config.vocab_size / step
                                                  for s in SAMPLE_SECONDS_PER_LOGIT[engine.ops.name])
        policy = cls(spec, drafters, costs, verify, trees=greedy and engine.verifies_trees,
                     host_cost=HOST_DRAFT_SECONDS[engine.ops.name] / step, sample_cost=sample)
        if spec.k is None and not policy.could_pay():
            return None
        if greedy:
            policy.memory = engine.draft_memory
            policy.memory.seed(policy)
        return policy

    def finish(self) -> None:
        """The request is over: a greedy one leaves what it measured to the memory it started from."""
        if self.memory is not None:
            self.memory.keep(self)

    def acceptance(self, drafter: str) -> float:
        return estimate(self.hits[drafter], self.misses[drafter])

    def leaf_acceptance(self, drafter: str) -> float:
        """How often the drafter's runner-up at its first rejected proposal is the model's token."""
        return estimate(self.leaf_hits[drafter], self.leaf_misses[drafter])

    def rate(self, drafter: str, k: int, batch: int = 1, tree: bool = False) -> float:
        """A pass of k tokens by drafter (with tree, and a leaf each: 2k + 1 rows) in a step of
        `batch` decodes, in plain steps' worth: above 1 it beats a plain step. A tree's pass
        gives a token more where a proposal is rejected (1 - a^k) and its leaf holds the
        model's token."""
        return self._rate(self.acceptance(drafter), self.leaf_acceptance(drafter), drafter, k, batch, tree)

    def _rate(self, a: float, leaf: float, drafter: str, k: int, batch: int, tree: bool) -> float:
        tokens = expected_tokens(a, k) + (1.0 - a ** k) * leaf * tree
        lookup = self.drafters[drafter] is None
        drawn = 0 if lookup else k  # a sampled model draft draws each proposal from its distribution
        distribution, draw = self.sample_cost
        cost = (self.verify_cost[2 * k if tree else k] + k * self.draft_cost[drafter]
                + (self.host_cost if lookup else 0.0)
                + (tokens + drawn) * distribution + (1 + drawn) * draw)
        return (batch - 1 + tokens) / (batch * cost)

    def could_pay(self) -> bool:
        """Whether some pass would beat a plain step alone if every proposal were kept."""
        return any(self._rate(1.0, 1.0, d, k, 1, tree) > 1.0 for d in self.drafters
                   for tree in self.tree_options[d] for k in self.ks)

    def _best(self, batch: int) -> tuple[float, str, int, bool]:
        """(rate, drafter, k, tree) of the best pass. It changes only with an update, and the
        scheduler asks for it each step of each request (~40 us: 16 k by 3 drafters, and
        trees), so it is kept until the next update."""
        if batch not in self._best_pass:
            self._best_pass[batch] = max(((self.rate(d, k, batch, tree), d, k, tree) for d in self.drafters
                                          for tree in self.tree_options[d] for k in self.ks),
                                         key=lambda r: r[0])  # max keeps the first of equals
        return self._best_pass[batch]

    def plain_steps_ahead(self, batch: int = 1) -> int:
        """How many of the next calls to next(batch) return None (a plain step) if no pass's
        outcome comes between: the engine decodes that run ahead of the host."""
        if self.k is not None or self._best(batch)[0] > 1.0:
            return 0
        return self.probe_after - self.plain_run

    def next(self, batch: int = 1) -> Choice | None:
        """The next pass's drafter and k in a step of `batch` decodes, or None for a plain step."""
        best_rate, name, k, tree = self._best(batch)
        if self.k is None and best_rate <= 1.0:
            self.plain_run += 1
            if self.plain_run <= self.probe_after:
                return None
            self.plain_run, self.probe_after = 0, min(2 * self.probe_after, PROBE_MAX)
        elif self.k is None:
            self.plain_run, self.probe_after = 0, PROBE_FIRST
        return Choice(name, self.drafters[name], k, tree)

    def update(self, drafter: str, drafted: int, accepted: int, leaf_hit: bool | None = None) -> None:
        """A pass's outcome: `accepted` of `drafted` proposals kept, and whether the leaf at
        the first rejected one held the model's token (None: a pass without a tree, or with
        nothing rejected). A pass that proposed
        nothing (lookup found no match) gave what a first proposal rejected gives, and counts
        as one: else a drafter that rarely proposes kept its prior (1/2) and was chosen for it
        (the GPU's auto took lookup in 362 of 616 code passes, 1.08x plain beside skip:3's 1.31x)."""
        self._best_pass.clear()
        self.hits[drafter] = DECAY * self.hits[drafter] + accepted
        self.misses[drafter] = DECAY * self.misses[drafter] + (1.0 if accepted < drafted or drafted == 0 else 0.0)
        if leaf_hit is not None:  # a tree's leaf at the first rejected proposal
            self.leaf_hits[drafter] = DECAY * self.leaf_hits[drafter] + leaf_hit
            self.leaf_misses[drafter] = DECAY * self.leaf_misses[drafter] + (not leaf_hit)


class DraftMemory:
    """One engine's memory of speculation across its greedy requests: each drafter's decayed
    counts (by its name and layers), the wait before a probe and the plain steps since the last
    pass, as the last greedy request to finish left them (`keep`), for the next one to start
    from (`seed`)."""

    def __init__(self):
        self.counts: dict[tuple, tuple[float, float, float, float]] = {}
        self.probe_after, self.plain_run = PROBE_FIRST, 0

    def seed(self, policy: DraftPolicy) -> None:
        """A new policy, before its first `next`, from what the memory holds."""
        for name, layers in policy.drafters.items():
            if (name, layers) in self.counts:
                (policy.hits[name], policy.misses[name], policy.leaf_hits[name],
                 policy.leaf_misses[name]) = self.counts[name, layers]
        policy.probe_after, policy.plain_run = self.probe_after, self.plain_run

    def keep(self, policy: DraftPolicy) -> None:
        for name, layers in policy.drafters.items():
            self.counts[name, layers] = (policy.hits[name], policy.misses[name], policy.leaf_hits[name],
                                         policy.leaf_misses[name])
        self.probe_after, self.plain_run = policy.probe_after, policy.plain_run
