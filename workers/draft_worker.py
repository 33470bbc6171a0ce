"""DraftWorker: proposes the next tokens of sequences by prompt lookup.

For each sequence it returns the tokens that followed the latest earlier occurrence of the
sequence's last n-gram (shorter n-grams as fallback): free, and strong on code and quoted
text. Nothing calls it yet: the engine has no verification step that would score the
proposals.
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
