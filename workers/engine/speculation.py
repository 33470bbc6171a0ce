"""Self-speculative decoding: a drafter proposes the next k tokens cheaply, the model scores
them all in one forward pass, and the proposals the model agrees with are kept, plus one
token of the model's own after them. Greedy: a proposal is kept while it equals the model's
argmax, so the tokens are those of plain greedy decoding. Sampled: each proposal d is kept
with probability min(1, p(d) / q(d)) (p the model's distribution, q the drafter's), and the
first rejection draws from norm(max(0, p - q)) instead (Leviathan et al. 2023; Chen et al.
2023): the tokens are distributed exactly as plain sampling's, drawn from the request's own
seeded generator.

A decode step reads every weight once whatever the number of tokens it scores, so when the
step is bound by the weights' bytes (streamed layers, the CPU, small batches) a pass that
keeps m + 1 tokens costs about what a pass that keeps one does. Drafters:
- lookup: the tokens that followed the latest earlier occurrence of the sequence's last
  n-gram (no model; strong on code and quoted text);
- early exit: the model's first d layers, then its final norm and output head, one token at
  a time (with streaming, the resident layers);
- skip: the model with a calibrated set of layers passed over by the residual stream (Draft &
  Verify, SWIFT; the set from `ntr calibrate-skip`, workers/engine/skip_calibration.py).
Both model drafters are `Engine.forward(layers=...)` over a subset of the layers (early exit a
prefix of them); a greedy draft's steps each take the previous step's id on the device
(`Engine.start_chain`), and the verifying pass takes the draft's ids there too (its tokens
name them, `propose`), so the host builds and launches the pass while the draft computes and
waits once a pass. The KV they write for the drafted
positions is what the verifying pass writes again in every layer, so nothing is recomputed
after a rejection. The verifying pass of n tokens runs as the decode step of n sequences,
each row the sequence at one of the positions (`Engine.forward(decode_rows=True)`): on the
GPU that step replays the captured graph of batch n, whose attention is plain decoding's
kernel (its products are batch n's). Rejected tokens leave the sequence and their KV blocks
go back (BlockManager.trim). With `k=None` or drafter "auto" the drafter and k are chosen per
pass from the sequence's measured acceptance (workers/engine/draft_policy.py).

Draft trees (greedy model drafts, `Choice.tree`): the chain also gives the drafter's runner-up
token at each drafted position, and the pass scores each as a leaf row beside the chain's
(`Engine._plan`'s leaves: a leaf sees its sequence's positions before its own and itself; its
KV goes to a slot after the proposals'). Where the first rejected proposal's leaf is the
model's token, that token is kept and the model's token after it comes from the leaf's row:
a token more for that pass, its KV moved to its position (`Engine.move_kv`). On the default
model the skip drafter's runner-up is the model's token at 38% of its rejections on code (23%
on prose): skip 12 at k=3 keeps 2.45 tokens a pass instead of 2.19. A leaf costs a row of the
pass: nearly nothing where the pass streams layers, a fifth to half a step on the CPU.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from kernels.numpy_backend import draw
from workers.engine.sampling import logprob_picks

DRAFTERS = ("lookup", "early-exit", "skip")  # "auto" chooses among them (draft_policy.py)
MAX_K = 16
TREE_SETTINGS = {"auto": None, "on": True, "off": False}  # Speculation.tree by setting


def lookup_proposal(token_ids: list[int], k: int, ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the last n-gram (shorter n-grams as fallback)."""
    for n in range(min(ngram, len(token_ids) - 1), 0, -1):
        tail = token_ids[-n:]
        for start in range(len(token_ids) - n - 1, -1, -1):
            if token_ids[start:start + n] == tail:
                return token_ids[start + n:start + n + k]
    return []


@dataclass(frozen=True)
class Speculation:
    k: int | None  # tokens drafted per pass; None ("auto"): chosen per pass, plain steps included
    drafter: str = "lookup"  # one of DRAFTERS, or "auto"
    depth: int | None = None  # early exit: layers the drafter runs (default: the resident ones when
    # layers stream, else a quarter of them)
    skip: tuple[int, ...] | None = None  # skip: the layers the drafter passes over
    # a greedy model draft's passes also verify its runner-up token at each drafted position
    # (Choice.tree): None where the policy expects that to pay, True always, False never
    tree: bool | None = None

    def __post_init__(self):
        if self.k is not None and not 1 <= self.k <= MAX_K:
            raise ValueError(f"speculate must be in [1, {MAX_K}] drafted tokens, got {self.k}")
        if self.drafter not in (*DRAFTERS, "auto"):
            raise ValueError(f"unknown drafter {self.drafter!r}; choose one of {', '.join(DRAFTERS)}, auto")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"draft layers must be >= 1, got {self.depth}")
        if self.drafter == "skip" and self.skip is None:
            raise ValueError("the skip drafter needs a skip set (--skip-set FILE from ntr calibrate-skip)")

    @classmethod
    def from_setting(cls, speculate: str | int | None, drafter: str = "lookup", depth: int | None = None,
                     skip: tuple[int, ...] | None = None, tree: str = "auto") -> "Speculation | None":
        """The speculation a setting asks for (`--speculate`, a server config's `speculate`):
        off (or 0, or None) -> None, auto -> k chosen per pass, K -> K tokens a pass; tree
        (`--draft-tree`, `draft_tree`) auto, on or off."""
        if tree not in TREE_SETTINGS:
            raise ValueError(f"draft tree must be one of {', '.join(TREE_SETTINGS)}, got {tree!r}")
        if speculate is None or speculate in ("off", 0, "0"):
            return None
        if speculate == "auto":
            return cls(None, drafter, depth, skip, TREE_SETTINGS[tree])
        try:
            k = int(speculate)
        except ValueError:
            raise ValueError(f"speculate must be off, auto or a number of tokens, got {speculate!r}") from None
        return cls(k, drafter, depth, skip, TREE_SETTINGS[tree])

    def drafters(self, n_layers: int, resident: tuple[int, ...] | None = None) -> dict[str, tuple[int, ...] | None]:
        """The drafters this may use, each with the layers it runs (None: lookup, no model);
        resident: the layers that stay on the device (`Engine.resident_layers`), the early-exit
        draft by default when they are a proper prefix (the others stream)."""
        names = [self.drafter] if self.drafter != "auto" else [d for d in DRAFTERS if d != "skip" or self.skip]
        depth = self.depth or max(1, n_layers // 4)
        if self.depth is None and resident and len(resident) < n_layers and resident == tuple(range(len(resident))):
            depth = len(resident)
        layers = {"lookup": None, "early-exit": tuple(range(min(depth, n_layers)))}
        if self.skip is not None:
            bad = [i for i in self.skip if not 0 <= i < n_layers]
            if bad or len(set(self.skip)) >= n_layers:
                raise ValueError(f"skip set {list(self.skip)} must leave at least one of the model's {n_layers} "
                                 f"layers (out of range: {bad})")
            layers["skip"] = tuple(i for i in range(n_layers) if i not in set(self.skip))
        return {name: layers[name] for name in names}


@dataclass
class Stats:
    passes: int = 0  # verifying passes
    drafted: int = 0
    accepted: int = 0  # tokens kept beside the model's own one a pass (a leaf's included)
    plain_steps: int = 0  # decode steps an adaptive run took without a draft
    leaves: int = 0  # passes whose first rejected proposal had a leaf
    leaf_hits: int = 0  # ... that held the model's token
    choices: Counter = field(default_factory=Counter)  # passes by (drafter, "+tree" after a tree's; k)

    @property
    def tokens_per_pass(self) -> float:
        return (self.accepted + self.passes) / self.passes if self.passes else 0.0


@dataclass(frozen=True)
class Choice:
    """A verifying pass's drafter, the layers it runs (None: lookup) and k; with tree, the pass
    also verifies the drafter's runner-up at each drafted position (a greedy model draft's)."""

    drafter: str
    layers: tuple[int, ...] | None
    k: int
    tree: bool = False

    def rows(self, k: int | None = None) -> int:
        """The rows a pass of k drafted tokens (this k if None) takes: the sequence's last
        token, the drafts and, with tree, a leaf each."""
        k = self.k if k is None else k
        return 1 + k * (2 if self.tree else 1)

    def cut(self, rows: int) -> "Choice":
        """This choice, its k cut so that its pass takes at most 1 + rows rows (>= 1); a tree
        with room for one draft only drafts that one without its leaf."""
        if self.rows() <= 1 + rows:
            return self
        if self.tree and rows < 2:
            return replace(self, k=rows, tree=False)
        return replace(self, k=rows // (2 if self.tree else 1))


@dataclass
class Draft:
    """One sequence's share of a verifying pass: its proposals and, when a sampler drew them,
    the drafter's distribution for each (q_rows; None: each proposal was certain); for a
    tree, the drafter's runner-up at each proposal's position (alternatives, one leaf row
    each). `accept` records the outcome: proposals kept, and whether the leaf at the first
    rejected one was the model's token (None: no leaf there)."""

    seq: object  # workers.engine.engine.Sequence
    choice: Choice
    proposed: list[int]
    q_rows: list | None = None
    sampler: object = None  # the request's Sampler; None: greedy
    alternatives: list[int] = field(default_factory=list)
    accepted: int = 0  # proposals kept
    leaf_hit: bool | None = None
    # a greedy chain's draft: proposed and alternatives name the ids the pass is fed on the
    # device (negative tokens, `propose`) until this gives them from the host
    pending: Callable[[], tuple[list[int], list[int]]] | None = None

    @property
    def rows(self) -> int:
        """Its rows of the pass: the last token, the proposals, the leaves."""
        return len(self.proposed) + 1 + len(self.alternatives)

    @property
    def reads_argmax_only(self) -> bool:
        """Whether `accept` reads only its rows' argmax: greedy, no logprobs asked for."""
        return self.sampler is None or (self.sampler.params.greedy and self.sampler.params.logprobs is None)

    def settle(self) -> None:
        """The proposals and alternatives as the host reads them (a chain's: once its pass is done)."""
        if self.pending is not None:
            self.proposed, self.alternatives = self.pending()
            self.pending = None


def propose(engine, asks: list[tuple[object, Choice, int, object]]) -> tuple[list[Draft], list]:
    """Each (seq, choice, limit, sampler)'s draft of up to min(k, limit - 1) tokens after seq
    (whose last token is not cached yet): by lookup, or by the model's `layers`. The greedy
    model drafts of the same layers, k and tree run as one chain over all their sequences (k
    decode steps of that batch, each fed the last one's ids on the device; a tree's also give
    each step's runner-up, the draft's alternatives), started and not waited for: their
    proposals and alternatives are negative tokens naming the chains' ids, the returned feed
    (`Engine.start_forward`), which the verifying pass takes on the device, so it is built and
    launched while the draft computes; `Draft.settle` reads them once the pass is done. A
    sampled draft's steps go through the host, which draws (no tree). The sequences are as
    they were when this returns."""
    drafts: list[Draft | None] = [None] * len(asks)
    chains: dict[tuple, list[int]] = {}
    for i, (seq, choice, limit, sampler) in enumerate(asks):
        k = min(choice.k, limit - 1)
        greedy = sampler is None or sampler.params.greedy
        if k <= 0 or choice.layers is None:
            drafts[i] = Draft(seq, choice, lookup_proposal(seq.token_ids, k) if k > 0 else [], None, sampler)
        elif greedy:
            chains.setdefault((choice.layers, k, choice.tree), []).append(i)
        else:
            drafts[i] = Draft(seq, choice, *_sampled_draft(engine, seq, choice.layers, k, sampler), sampler)
    feed, named = [], 0
    for (layers, k, tree), members in chains.items():
        ids, tokens = engine.start_chain([asks[i][0] for i in members], k, layers, runner_up=tree)
        B = len(members)
        for b, i in enumerate(members):
            # ids [k, B], or [2, k, B] with the runner-ups, after the feed's earlier chains'
            name = [[-1 - (named + (r * k + j) * B + b) for j in range(k)] for r in range(2 if tree else 1)]
            drafts[i] = Draft(asks[i][0], asks[i][1], name[0], None, asks[i][3], name[1] if tree else [],
                              pending=functools.partial(_chain_draft, tokens, b, tree))
        feed.append(ids)
        named += B * k * (2 if tree else 1)
    return drafts, feed


def _chain_draft(tokens: Callable[[], list], b: int, tree: bool) -> tuple[list[int], list[int]]:
    got = tokens()[b]
    return got if tree else (got, [])


def _sampled_draft(engine, seq, layers: tuple[int, ...], k: int, sampler) -> tuple[list[int], list]:
    """k tokens drawn from the model's `layers` one step at a time, and their distributions."""
    proposed, q_rows, start, cached = [], [], len(seq.token_ids), seq.num_cached
    try:
        for _ in range(k):
            engine.reserve([(seq, 1)])
            q_rows.append(sampler.distribution(engine.forward([(seq, 1)], layers=layers)[-1]))
            token = draw(q_rows[-1], sampler.rng.random())
            proposed.append(token)
            seq.token_ids.append(token)
    finally:  # the verifying pass writes these positions' KV again, in every layer
        del seq.token_ids[start:]
        seq.num_cached = cached
    return proposed, q_rows


def accept_sampled(p_row: Callable[[int], np.ndarray], q_rows: list | None, proposed: list[int], rng) -> list[int]:
    """Rejection sampling over one verifying pass: p_row(i) the model's probabilities [vocab] at
    position i of the pass (asked only for the positions the rule reaches: each costs a pass
    over the vocabulary on the host), q_rows the drafter's (None: proposals were certain). The
    kept proposals and one token drawn by the rule, together distributed as plain sampling.
    Each draw is plain sampling's `draw` of one uniform number from rng (numpy's
    Generator.choice, used before, spent ~1.5 ms more on a 262k-token row checking and
    normalizing it)."""
    for i, d in enumerate(proposed):
        p = p_row(i)
        if rng.random() < min(1.0, p[d] / (q_rows[i][d] if q_rows is not None else 1.0)):
            continue
        if q_rows is not None:
            residual = np.maximum(p - q_rows[i], 0.0)
        else:  # a certain proposal's q is one-hot: max(p - q, 0) is p without d
            residual = p.copy()
            residual[d] = 0.0
        return proposed[:i] + [draw(residual, rng.random())]
    p = p_row(len(proposed))
    return proposed + [draw(p, rng.random())]


def start_pass(engine, drafts: list[Draft], plain: list = (), feed: list | None = None):
    """Start one verifying pass: the sequences of `plain` (each fed its last token) and then
    each draft's (fed its last token and proposals, then its alternatives as leaf rows, the
    i-th at the i-th proposal's position) as the rows of one decode step
    (`Engine.forward(decode_rows=True)`), their KV blocks reserved (a leaf's KV goes to a
    slot after the proposals'); feed: `propose`'s, the ids its chains' drafts name. Returns a
    function that waits for the pass: (the logits of every row, in that order, on the device;
    `pass_rows`'s function of them). Through pipeline stages a pass of drafts alone whose
    acceptance reads only each row's argmax brings back the last stage's ids of each row
    instead of its vocabulary-wide logits (`Engine.start_forward(best=True)`), and the logits
    are then None. The proposals are not left in the sequences; each counts them cached until
    `accept` settles it."""
    work = [(seq, 1) for seq in plain] + [(d.seq, len(d.proposed) + 1) for d in drafts]
    leaves = [[]] * len(plain) + [[(j + 1, t) for j, t in enumerate(d.alternatives)] for d in drafts]
    best = engine.pipeline is not None and not plain and all(d.reads_argmax_only for d in drafts)
    for d in drafts:
        d.seq.token_ids.extend(d.proposed)
    try:
        engine.reserve([(seq, n + len(leaf)) for (seq, n), leaf in zip(work, leaves)])
        result = engine.start_forward(work, all_logits=True, device=True, decode_rows=True, leaves=leaves,
                                      before_draft=True, feed=feed or None, best=best)
    finally:
        for d in drafts:
            del d.seq.token_ids[len(d.seq.token_ids) - len(d.proposed):]

    def wait() -> tuple[object, Callable[[int, int], tuple[np.ndarray, Callable[[], np.ndarray]]]]:
        out = result()
        return (None, pass_rows(engine, None, out[0])) if best else (out, pass_rows(engine, out))

    return wait


def accept(engine, d: Draft, best: np.ndarray, rows: Callable[[], np.ndarray], logprobs: Callable,
           stats: Stats) -> list[tuple]:
    """The pass's outcome for one draft: best, the model's argmax at each of its rows
    [d.rows] (host ids, found beside the logits), rows(), those rows of logits (host
    float32), asked for only where the sampler needs them (the greedy pass of a 0.5B model
    copied 2.4 MB of logits a draft and searched them on the host), and logprobs(rows, tokens,
    n), `ops.token_logprobs` of some of them beside the logits. -> the kept proposals and
    the model's token after them, greedy or drawn by its sampler (no penalties), each as
    (token, logprob, top) as plain sampling gives them (the logprobs of the raw distribution
    at the token's position, where the sampler asks for them; else None). Greedy, where the
    first rejected proposal's leaf holds the model's token, that token is kept too, and the
    model's token after it comes from the leaf's row: the leaf's KV moves to its position
    (`Engine.move_kv`). Its sequence then caches its last token and the kept tokens but the
    last, which the caller appends (with the last token, not cached yet); the rejected ones'
    KV blocks go back."""
    d.settle()
    proposed, seq, n = d.proposed, d.seq, len(d.proposed) + 1
    base = seq.num_cached - n  # seq's last token's position
    token_rows = None  # the row each kept token's logprobs come from (None: rows 0..)
    if d.sampler is None or d.sampler.params.greedy:
        m = 0
        while m < len(proposed) and proposed[m] == best[m]:
            m += 1
        kept = proposed[:m] + [int(best[m])]
        if m < len(d.alternatives):
            d.leaf_hit = d.alternatives[m] == best[m]
            if d.leaf_hit:  # leaf m sits at position base + m + 1; its KV at the slot of base + n + m
                engine.move_kv(seq, base + n + m, base + m + 1)
                kept.append(int(best[n + m]))
                token_rows = [*range(m + 1), n + m]
    else:
        kept = accept_sampled(lambda i: d.sampler.distribution(rows()[i]), d.q_rows, proposed, d.sampler.rng)
        m = len(kept) - 1
    d.accepted = m
    engine.blocks.trim(seq, base + len(kept))
    seq.num_cached = base + len(kept)
    stats.passes += 1
    stats.drafted += len(proposed)
    stats.accepted += len(kept) - 1
    stats.leaves += d.leaf_hit is not None
    stats.leaf_hits += bool(d.leaf_hit)
    stats.choices[d.choice.drafter + ("+tree" if d.alternatives else ""), d.choice.k] += 1
    n_top = None if d.sampler is None else d.sampler.params.logprobs
    if n_top is None:
        return [(t, None, None) for t in kept]
    return logprob_picks(kept, logprobs(token_rows or list(range(len(kept))), kept, n_top), [n_top] * len(kept))


def pass_rows(engine, out, best: np.ndarray | None = None) -> Callable[[int, int], tuple]:
    """A verifying pass's logits on the device -> (first, n) -> (the model's argmax at rows
    first..first+n, a function that copies those rows to the host once, when first asked, and
    one that finds the logprobs of some of them beside the logits (`ops.token_logprobs` of
    rows [first + r for r in picked])): `accept`'s arguments for the draft whose rows they are.
    The argmax of every row is found once, on the device (a decode graph's replay has found it
    already); best: found already (the last pipeline stage's), with no logits (out None)."""
    ops = engine.ops
    best = ops.argmax(out) if best is None else best

    def logits(rows: list[int]):
        if out is None:
            raise RuntimeError("this pass brought back its rows' argmax only (`Draft.reads_argmax_only`)")
        return ops.take_rows(out, rows)

    def rows(first: int, n: int) -> tuple:
        @functools.cache
        def host() -> np.ndarray:
            return ops.to_numpy(logits(list(range(first, first + n)))).astype(np.float32, copy=False)

        def logprobs(picked: list[int], tokens: list[int], n_top: int) -> tuple:
            return ops.token_logprobs(logits([first + r for r in picked]), tokens, n_top)

        return best[first:first + n], host, logprobs

    return rows


def start_verify(engine, seq, choice: Choice, limit: int, stats: Stats, sampler=None,
                 after: list[int] = ()) -> Callable[[], tuple[list[tuple], Draft]]:
    """Start one sequence's draft (`propose`) and the pass over it, after the tokens `after`,
    which the previous pass kept and the caller has not appended to seq yet (it appends them
    while this pass runs, as it hands them out: their host work then overlaps the GPU's).
    Returns a function that waits for the pass and settles it: (the kept tokens (1..k+1, at
    most limit), each as `accept` gives it, and the draft, its outcome recorded)."""
    seq.token_ids.extend(after)
    try:
        (d,), feed = propose(engine, [(seq, choice, limit, sampler)])
        result = start_pass(engine, [d], feed=feed)
    finally:
        del seq.token_ids[len(seq.token_ids) - len(after):]

    def finish() -> tuple[list[tuple], Draft]:
        rows = result()[1]
        return accept(engine, d, *rows(0, d.rows), stats), d

    return finish
