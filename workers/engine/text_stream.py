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
        # pending is only the held-back text (shorter than the longest stop string) and the new
        # text, so a stop string that ends in the new text is found here, at a cost that follows
        # the new text rather than the stop strings' length or the whole completion
        hits = [i for s in self.stop if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        cut = min((self._tail_start(s) for s in self.stop), default=len(self.pending))
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _tail_start(self, stop: str) -> int:
        """Where the longest tail of pending that begins stop starts (len(pending): none)."""
        text = self.pending
        i = text.find(stop[0], max(0, len(text) - len(stop) + 1))
        while i >= 0 and not stop.startswith(text[i:]):
            i = text.find(stop[0], i + 1)
        return len(text) if i < 0 else i
