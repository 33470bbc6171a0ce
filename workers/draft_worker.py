"""DraftWorker: proposes the next tokens of sequences by prompt lookup.

For each sequence it returns the tokens that followed the latest earlier occurrence of the
sequence's last n-gram (shorter n-grams as fallback): free, and strong on code and quoted
text. Nothing calls it yet: `Engine.generate` drafts and verifies in the ComputeWorker's own
process (workers/engine/speculation.py), its drafter and k chosen per pass by a DraftPolicy
(workers/engine/draft_policy.py); this actor is where that policy moves, one per sequence, when
the server speculates.
"""

from __future__ import annotations

import ray

from workers.engine.speculation import lookup_proposal


@ray.remote(num_cpus=0)
class DraftWorker:
    def __init__(self, k: int = 4, ngram: int = 3):
        self.k, self.ngram = k, ngram

    def propose(self, sequences: dict[str, list[int]]) -> dict[str, list[int]]:
        """Draft tokens for each of a step's sequences (by request id), in one call per step."""
        return {rid: lookup_proposal(ids, self.k, self.ngram) for rid, ids in sequences.items()}
