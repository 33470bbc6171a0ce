"""Sampling parameters, their validation, and the host-side sampler.

Order of operations (as in llama.cpp's default chain): the logit bias and the grammar's token
mask (workers/engine/grammar.py) on the raw logits, then penalties, then temperature, then the top-k / top-p / min-p filters, then a draw from the request's own
generator (same seed, same tokens). Reported logprobs are those of the model's raw
distribution, as OpenAI's API reports them, not of the filtered one.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from kernels.numpy_backend import draw, kept_weights
from kernels.ops import LogitBias, constrain_logits
from workers.engine.grammar import Constraint, GrammarSpec

# Stop strings: OpenAI's count, and a length that no real stop sequence needs (vLLM and
# OpenAI set none; a request's stop strings are matched against its text at every token).
MAX_STOP = 4
MAX_STOP_LENGTH = 256  # characters
MAX_LOGIT_BIAS = 1024  # entries; OpenAI's clients send a few hundred at most
MAX_BIAS = 100.0  # OpenAI's range is [-100, 100]: -100 bans a token, 100 forces it

PRESETS = {
    "greedy": dict(temperature=0.0),
    "balanced": dict(temperature=0.8, top_k=40, top_p=0.9),
    "creative": dict(temperature=1.2, top_k=100, top_p=0.95),
}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    cut_to_context: bool = False  # max_tokens is a default, not asked for: cut it to the room the prompt leaves
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the top n
    # the prompt's tokens' too (an echo's logprobs; the serving scheduler's): None none; n as logprobs
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, ids checked against the vocabulary by the engine
    grammar: GrammarSpec | None = None  # constrained decoding: every token keeps the text in the grammar

    def __post_init__(self):
        def bad(name, rule):
            value = repr(getattr(self, name))  # cut: a bad stop list may be megabytes
            value = value[:60] + "..." if len(value) > 64 else value
            raise ValueError(f"invalid sampling parameter {name}={value}: {rule}")

        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, "must be a finite number")
            return value

        if not 0.0 <= number("temperature") <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be an integer >= 0 (0 or -1 disables it)")
        if not 0.0 < number("top_p") <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not 0.0 <= number("min_p") <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not 0.0 < number("repetition_penalty") <= 10.0:
            bad("repetition_penalty", "must be in (0, 10]")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                bad(name, "must be in [-2, 2]")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", "must be an integer >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20):
                bad(name, "must be an integer in [0, 20]")
        if len(self.stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH
                                                for s in self.stop):
            bad("stop", f"must be at most {MAX_STOP} non-empty strings of at most {MAX_STOP_LENGTH} characters")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        try:
            bias = tuple((int(t), float(b)) for t, b in bias if not isinstance(t, bool) and not isinstance(b, bool)
                         and float(t) == int(t)) if len(bias) <= MAX_LOGIT_BIAS else None
        except (TypeError, ValueError):
            bias = None
        if bias is None or len(bias) != len(self.logit_bias):
            bad("logit_bias", f"must map at most {MAX_LOGIT_BIAS} integer token ids to numbers")
        for t, b in bias:
            if t < 0:
                bad("logit_bias", f"token id {t} is negative")
            if not -MAX_BIAS <= b <= MAX_BIAS:  # also NaN
                bad("logit_bias", f"bias {b} of token {t} must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}]")
        if len({t for t, _ in bias}) != len(bias):
            bad("logit_bias", "names a token id twice")
        object.__setattr__(self, "logit_bias", bias)
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            bad("grammar", "must be a GrammarSpec")
        if self.grammar is not None and self.ignore_eos:
            bad("ignore_eos", "cannot be set with a grammar (a finished grammar allows only the end of the text)")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "top_k", max(self.top_k, 0))  # vLLM's -1 is our 0
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @classmethod
    def preset(cls, name: str, **overrides) -> "SamplingParams":
        if name not in PRESETS:
            raise ValueError(f"unknown sampling preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**(PRESETS[name] | overrides))

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def id_only(self) -> bool:
        """Only the token's id is wanted (no logprobs, no penalties, which read the request's
        history on the host): a greedy step may read its argmax alone (`Engine.decodes_ahead`)."""
        return self.logprobs is None and not self.penalized

    @property
    def constrained(self) -> bool:
        """A grammar or a logit bias changes the logits before any draw: no fast path that
        reads the raw argmax may serve it."""
        return self.grammar is not None or bool(self.logit_bias)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


@dataclass
class Sampler:
    """Per-request sampling state: the generator, the counts the penalties need, and the
    grammar's matcher (the engine makes it from params.grammar)."""

    params: SamplingParams
    constraint: Constraint | None = None
    history: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)
        if self.params.grammar is not None and self.constraint is None:
            raise ValueError("a request with a grammar needs its Constraint")
        b = self.params.logit_bias
        self.bias = LogitBias(np.zeros(len(b), np.int32), np.array([t for t, _ in b], np.int32),
                              np.array([v for _, v in b], np.float32)) if b else None

    def accept(self, token: int) -> None:
        """Remember a token drawn for this request (here or on the device)."""
        self.history[token] += 1
        if self.constraint is not None:
            self.constraint.consume(token)

    def next_draw(self, mask: np.ndarray | None = None) -> Draw:
        """Everything this request's next token is drawn with, its generator advanced as the
        draw needs (one uniform number at a temperature > 0, none greedy): the same numbers
        whether the draw then runs here, on the device, or on a pipeline's last stage. mask: the
        grammar's bitmask row for this step (computed here if None and the request has a grammar)."""
        p = self.params
        if p.grammar is not None and mask is None and self.constraint is not None:
            mask = self.constraint.mask()
        seen = None
        if p.penalized and self.history:
            seen = (np.fromiter(self.history.keys(), dtype=np.int64),
                    np.fromiter(self.history.values(), dtype=np.float32))
        return Draw(p, 0.0 if p.greedy else float(self.rng.random()), mask, self.bias, seen)

    def sample(self, logits: np.ndarray, mask: np.ndarray | None = None) -> int:
        """Pick the next token from one row of float logits and remember it."""
        token = self.next_draw(mask).pick(logits)
        self.accept(token)
        return token

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The probabilities [vocab] a sampled token is drawn with from one row of logits
        (penalties aside): what speculative sampling accepts and rejects against."""
        w = filtered_weights(self.params, np.asarray(logits, dtype=np.float32))
        return w / w.sum()


def filtered_weights(p: SamplingParams, logits: np.ndarray) -> np.ndarray:
    """Temperature, top-k, top-p and min-p on one row, as the device's sampler applies them."""
    return kept_weights(logits, p.temperature, p.top_k, p.top_p, p.min_p)


@dataclass(frozen=True, eq=False)
class Draw:
    """One row's next-token draw with everything it needs and no state (picklable: a
    pipeline's last stage draws beside its logits, workers/engine/pipeline.py): the params,
    the uniform number from the request's generator, the grammar's bitmask row, the logit
    bias and, when penalized, the tokens seen so far with their counts."""

    params: SamplingParams
    uniform: float
    mask: np.ndarray | None = None
    bias: LogitBias | None = None
    seen: tuple[np.ndarray, np.ndarray] | None = None

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """One row of raw logits as the draw sees it: bias and mask, then the penalties."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.constrained:
            logits = constrain_logits(logits[None], None if self.mask is None else self.mask[None], self.bias)[0]
        if self.seen is not None:
            ids, counts = self.seen
            logits = logits.copy()
            seen = logits[ids]
            seen = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
            logits[ids] = seen - counts * p.frequency_penalty - p.presence_penalty
        return logits

    def pick(self, logits: np.ndarray) -> int:
        """The token from one row of raw logits: `adjusted`, then argmax or the filtered draw
        with `uniform`."""
        logits = self.adjusted(logits)
        if self.params.greedy:
            return int(np.argmax(logits))
        return draw(filtered_weights(self.params, logits), self.uniform)


def draw_rows(ops, logits, draws: list[Draw | None]) -> list[tuple[int, float | None, list | None] | None]:
    """(token, logprob, top) for each row of logits [B, vocab] (in ops' array type), None where
    the draw is None. Rows whose draw reads nothing of the request's history (no penalties) are
    drawn in one call where ops samples on the device (masks and biases applied there); the
    others are copied to the host and drawn there. The rows that ask for logprobs then get
    them from the raw distribution in one `ops.token_logprobs` (on the device: only those
    numbers leave it)."""
    tokens: list[int | None] = [None] * len(draws)
    wanted = [i for i, d in enumerate(draws) if d is not None]

    def rows(idx: list[int]):
        return logits if len(idx) == len(draws) else ops.take_rows(logits, idx)

    on_device = [i for i in wanted if ops.device_sampling and not draws[i].params.penalized]
    if on_device:
        ds = [draws[i] for i in on_device]
        picked_rows = rows(on_device)
        constrained = any(d.params.constrained for d in ds)
        if constrained:
            masks = [d.mask for d in ds]
            shape = next((m.shape for m in masks if m is not None), None)
            bitmask = None if shape is None else np.stack([np.full(shape, -1, np.int32) if m is None else m
                                                           for m in masks])
            biased = [(r, d.bias) for r, d in enumerate(ds) if d.bias is not None]
            bias = LogitBias(np.concatenate([np.full(len(b.ids), r, np.int32) for r, b in biased]),
                             np.concatenate([b.ids for _, b in biased]),
                             np.concatenate([b.values for _, b in biased])) if biased else None
            picked_rows = ops.constrain(picked_rows, bitmask, bias)
        if all(d.params.greedy for d in ds) and not constrained:  # a decode graph's replay already holds these ids
            ids = ops.argmax(picked_rows)
        else:
            ids = ops.sample(picked_rows, [d.params.temperature for d in ds], [d.params.top_k for d in ds],
                             [d.params.top_p for d in ds], [d.params.min_p for d in ds], [d.uniform for d in ds])
        for i, token in zip(on_device, ids.tolist()):
            tokens[i] = int(token)
    on_host = [i for i in wanted if tokens[i] is None]
    if on_host:
        for i, row in zip(on_host, ops.to_numpy(rows(on_host)).astype(np.float32, copy=False)):
            tokens[i] = draws[i].pick(row)
    scored = [i for i in wanted if draws[i].params.logprobs is not None]
    with_logprobs = {}
    if scored:
        n_tops = [draws[i].params.logprobs for i in scored]
        found = ops.token_logprobs(rows(scored), [tokens[i] for i in scored], max(n_tops))
        with_logprobs = dict(zip(scored, logprob_picks([tokens[i] for i in scored], found, n_tops)))
    return [None if t is None else with_logprobs.get(i, (t, None, None)) for i, t in enumerate(tokens)]


def logprob_picks(tokens: list[int], found: tuple[np.ndarray, np.ndarray, np.ndarray],
                  n_tops: list[int]) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """(token, its logprob, the top n (id, logprob)) for each token, from `ops.token_logprobs`'
    arrays (found for at least each row's n)."""
    lp, top_ids, top_lp = found
    return [(int(t), float(lp[r]), [(int(i), float(p)) for i, p in zip(top_ids[r, :n], top_lp[r, :n])])
            for r, (t, n) in enumerate(zip(tokens, n_tops))]
