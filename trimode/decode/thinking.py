"""The thinking budget: a row that has produced `budget` tokens inside an open `<think>` without
closing it emits the close sequence (`</think>`, one or more token ids) next, in every mode.

Each row with a budget carries a `ThinkState`: whether it is inside a think span (from its prompt:
a chat template with thinking on ends the prompt with `<think>\\n`), how many tokens it has produced
there, and close tokens still owed. Decoders hand every batch of tokens a forward produced for a row
to `plan` before emitting them; `plan` returns them unchanged, or cut at the first token that must be
forced, with that token replaced. A cut batch is consistent everywhere: the speculative decoders
commit to the cache only the inputs of the emitted prefix, and the forced token becomes the next
input exactly like a bonus token; diffusion cuts its block before the commit forward writes it.
When the close sequence has several tokens, the rest is forced over the following forwards.

Unlike the reference's linear speculation, the forced token is part of the output (the reference
substituted it into the cache and the next block but kept the model's own token in the output, so
the substitution repeated every cycle; docs/design-notes.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def _ends_with(seq: Sequence[int], tail: Sequence[int]) -> bool:
    return len(tail) > 0 and len(seq) >= len(tail) and list(seq[-len(tail):]) == list(tail)


def _last(seq: Sequence[int], pat: Sequence[int]) -> int:
    """Index just past the last occurrence of `pat` in `seq` (-1 if none)."""
    n = len(pat)
    for i in range(len(seq) - n, -1, -1):
        if list(seq[i:i + n]) == list(pat):
            return i + n
    return -1


@dataclass
class ThinkState:
    budget: int
    open_ids: tuple[int, ...]
    close_ids: tuple[int, ...]
    inside: bool = False
    count: int = 0  # tokens produced inside the current think span
    pending: list[int] = field(default_factory=list)  # close tokens still owed
    tail: list[int] = field(default_factory=list)  # the last tokens (to match multi-token markers)

    @classmethod
    def for_prompt(cls, prompt: Sequence[int], budget: int, open_ids: Sequence[int],
                   close_ids: Sequence[int]) -> ThinkState:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ValueError(f"max_thinking_tokens must be an integer >= 0, got {budget!r:.40}")
        if not open_ids or not close_ids:
            raise ValueError("a thinking budget needs the token ids of <think> and </think>")
        st = cls(budget, tuple(int(t) for t in open_ids), tuple(int(t) for t in close_ids))
        # Inside when the prompt's last <think> is not closed (only generated tokens count, as NLD's).
        st.inside = _last(prompt, st.open_ids) > _last(prompt, st.close_ids)
        keep = max(len(st.open_ids), len(st.close_ids))
        st.tail = list(prompt[-keep:]) if keep else []
        return st

    def _want(self, inside: bool, count: int, pending: list[int]) -> int | None:
        if pending:
            return pending[0]
        if inside and count >= self.budget:
            return self.close_ids[0]
        return None

    def _step(self, inside: bool, count: int, pending: list[int], tail: list[int], t: int):
        pending = list(pending)
        if pending:
            pending.pop(0)
        elif inside and count >= self.budget:  # t is close[0] (forced, or the model's own choice)
            pending = list(self.close_ids[1:])
        tail = (tail + [t])[-max(len(self.open_ids), len(self.close_ids)):]
        if _ends_with(tail, self.close_ids):
            inside, pending = False, []
        elif _ends_with(tail, self.open_ids):
            inside, count = True, 0
        elif inside:
            count += 1
        return inside, count, pending, tail

    def plan(self, toks: Sequence[int]) -> list[int]:
        """`toks` as they may be emitted from this state: unchanged, or cut at the first token the
        budget forces (that token replaced). Never longer, never empty when `toks` is not."""
        inside, count, pending, tail = self.inside, self.count, self.pending, self.tail
        out: list[int] = []
        for t in toks:
            want = self._want(inside, count, pending)
            if want is not None and int(t) != want:
                out.append(want)
                return out
            out.append(int(t))
            inside, count, pending, tail = self._step(inside, count, pending, tail, int(t))
        return out

    def advance(self, t: int) -> None:
        """Record one emitted token."""
        self.inside, self.count, self.pending, self.tail = self._step(self.inside, self.count, self.pending,
                                                                      self.tail, int(t))
