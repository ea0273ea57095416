"""Token ids to text deltas, with OpenAI stop strings matched on the detokenized text."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Feed token ids, get text deltas; stops at the first stop string, which is never emitted.

    Text that could be the beginning of a stop string is held back until the next ids decide it, so a
    stop string split across tokens (or across stream chunks) is still caught and nothing after it
    leaks. Built on `Tokenizer.stream()`, which never emits half of a UTF-8 character.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self._decoder = tokenizer.stream(skip_special_tokens=True)
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False  # a stop string was found

    def feed(self, ids: Sequence[int]) -> str:
        if self.stopped or not ids:
            return ""
        self._pending += self._decoder.feed(list(ids))
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back, once generation has ended."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        text = self._pending
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        if final:
            self._pending = ""
            return text
        keep = 0  # longest suffix of `text` that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self._pending = text[len(text) - keep:]
        return text[: len(text) - keep]
