"""DraftWorker: the seam for self-speculative decoding.

A draft source proposes the next few tokens of a sequence cheaply; the ComputeWorker will
verify them with one `Engine.forward(..., all_logits=True)` over the proposal and keep the
prefix the model agrees with, so a step can yield several tokens for one pass over the
weights (what matters when the weights stream from host RAM). The streaming work fills
this actor with the model's own first layers as the drafter and wires the verification
into the scheduler; until then it proposes by prompt lookup: the tokens that followed the
latest earlier occurrence of the sequence's last n-gram (good on code and quoting, free).
"""

from __future__ import annotations

import ray


def lookup_proposal(token_ids: list[int], k: int, ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the last n-gram (shorter n-grams as fallback)."""
    for n in range(min(ngram, len(token_ids) - 1), 0, -1):
        tail = token_ids[-n:]
        for start in range(len(token_ids) - n - 1, -1, -1):
            if token_ids[start:start + n] == tail:
                return token_ids[start + n:start + n + k]
    return []


@ray.remote(num_cpus=0)
class DraftWorker:
    def __init__(self, k: int = 4, ngram: int = 3):
        self.k, self.ngram = k, ngram

    def propose(self, sequences: dict[str, list[int]]) -> dict[str, list[int]]:
        """Draft tokens for each of a step's sequences (by request id), in one call per step."""
        return {rid: lookup_proposal(ids, self.k, self.ngram) for rid, ids in sequences.items()}
