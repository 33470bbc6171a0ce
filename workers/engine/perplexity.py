"""Perplexity of a model on a text, as llama.cpp's `llama-perplexity` measures it.

The text is tokenized whole, cut into non-overlapping chunks of `ctx` tokens (the tail that
does not fill a chunk is left out), and each chunk is evaluated from an empty cache. Where
the model's metadata adds a BOS token, the text's tokens start with it and each chunk's first
token is replaced by it (llama.cpp does both). A chunk is scored on its second half only, so
that every scored token sees at least ctx/2 tokens of context: the logits at positions
ctx/2 .. ctx-2 against the tokens that follow them. Perplexity is exp of the mean negative
log-likelihood over all scored tokens.

Several chunks go through one forward pass (their log-likelihoods computed where the logits
are, on the device for the GPU backend); how many is bounded by the memory their logit rows
take.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from workers.engine.engine import Engine, Sequence

MIN_CTX = 8
LOGITS_BUDGET_BYTES = 1 << 30  # float32 logit rows of one forward pass


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    tokens: int  # the whole text's
    chunks: int
    scored: int  # tokens whose log-likelihood counts

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens, "chunks": self.chunks, "scored": self.scored}


def text_ids(engine: Engine, text: str) -> list[int]:
    """The text as llama-perplexity tokenizes it: special tokens stay text, BOS where the model adds one."""
    return engine.tokenizer.encode(text, add_special=True, parse_special=False)


def chunks_per_pass(ctx: int, vocab_size: int) -> int:
    """Chunks one forward pass evaluates by default: as many as LOGITS_BUDGET_BYTES of scored
    logit rows hold (at least one)."""
    return max(1, LOGITS_BUDGET_BYTES // ((ctx - 1 - ctx // 2) * vocab_size * 4))


def check_ctx(ids: list[int], ctx: int, max_context: int) -> int:
    """The number of chunks; ValueError naming --ctx when there is none or ctx does not fit."""
    if not MIN_CTX <= ctx <= max_context:
        raise ValueError(f"--ctx must be in [{MIN_CTX}, {max_context}] (the model's context), got {ctx}")
    if len(ids) < ctx:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
    return len(ids) // ctx


def perplexity(engine: Engine, ids: list[int], ctx: int, per_pass: int,
               progress: Callable[[int], None] = lambda n: None) -> Perplexity:
    """Perplexity over the chunks of ids, per_pass chunks a forward pass (the engine's KV cache
    must hold per_pass * ctx tokens); progress(n) after each pass of n chunks."""
    n_chunks = check_ctx(ids, ctx, engine.max_context)
    first = ctx // 2
    bos = engine.tokenizer.bos_id if engine.tokenizer.add_bos else None
    nll, scored = 0.0, 0
    for start in range(0, n_chunks, per_pass):
        seqs = []
        for c in range(start, min(start + per_pass, n_chunks)):
            chunk = ids[c * ctx:(c + 1) * ctx]
            if bos is not None:
                chunk = [bos] + chunk[1:]
            seqs.append(Sequence(chunk))
        work = [(seq, ctx) for seq in seqs]
        # chunk b's rows first .. ctx-2 of the flat batch, predicting its tokens first+1 .. ctx-1
        rows = (np.arange(len(seqs))[:, None] * ctx + np.arange(first, ctx - 1)[None, :]).reshape(-1)
        targets = np.concatenate([seq.token_ids[first + 1:] for seq in seqs])
        try:
            engine.reserve(work)
            logits = engine.forward(work, device=True, rows=rows)
            nll -= float(engine.ops.token_logprobs(logits, targets)[0].sum())
        finally:
            for seq in seqs:
                engine.release(seq)
        scored += len(targets)
        progress(len(seqs))
    return Perplexity(math.exp(nll / scored), len(ids), n_chunks, scored)
