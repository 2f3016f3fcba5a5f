"""Text of one sequence as tokens arrive: incremental detokenization and stop strings.

A stop string ends the text before it and is never emitted, even when it spans several tokens.
While streaming, a tail of the text that could still grow into a stop string is held back: the
visible text only ever grows, and never shows what a later token could turn into a stop string.
"""

from __future__ import annotations


class TextState:
    def __init__(self, tokenizer, stop: tuple[str, ...], skip_special_tokens: bool = True):
        self._detok = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self.text = ""  # decoded so far, stop string cut off once found
        self.visible = 0  # characters of text that may be shown (the rest could start a stop)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token's text; returns the stop string it completed, if any (only looked
        for when check_stop: not before ``min_tokens``)."""
        piece = self._detok.add(token_id)
        return self._append(piece, check_stop) if piece else None

    def finish(self) -> str | None:
        """The sequence ended for another reason: release held-back text (it stopped nothing)."""
        stop = self._append(self._detok.flush())
        if stop is None:
            self.visible = len(self.text)
        return stop

    @property
    def visible_text(self) -> str:
        return self.text[: self.visible]

    def _append(self, piece: str, check_stop: bool = True) -> str | None:
        start = max(0, len(self.text) - self._longest_stop + 1)  # a new stop ends in piece
        self.text += piece
        if not self._stop or not check_stop:
            self.visible = len(self.text)
            return None
        hits = [(i, s) for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, stop = min(hits)
            self.text = self.text[:i]
            self.visible = len(self.text)
            return stop
        # max: text shown before min_tokens (stops not looked for) is never taken back
        self.visible = max(self.visible, len(self.text) - _held_back(self.text, self._stop))
        return None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
