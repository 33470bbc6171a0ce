"""Generated ids -> text deltas, never half a UTF-8 character, never part of a stop string."""

from __future__ import annotations

from workers.model.tokenizer import IncrementalDecoder, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = stop
        self.pending = ""  # decoded text not yet emitted because it may begin a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Text that is now safe to emit; sets `stopped` when a stop string completes."""
        self.pending += self.decoder.feed(token_id)
        return self._release()

    def finish(self) -> str:
        """The rest of the text once generation ended for another reason."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        out = self._release()
        if not self.stopped:
            out, self.pending = out + self.pending, ""
        return out

    def _release(self) -> str:
        hits = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if hits:
            cut = min(hits)[0]
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = max((n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out
