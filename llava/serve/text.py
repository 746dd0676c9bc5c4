"""One answer's text as its tokens arrive: incremental detokenisation with stop strings, for streaming.

Text is re-decoded from all of the answer's tokens at each step (a token alone may be half a character or
lose its leading space), and only the part that can no longer change is emitted: an incomplete UTF-8
sequence (decoded as U+FFFD) and a tail that could be the start of a stop string are held back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"


class TextStream:
    """The text of one answer, token by token; ``stop`` strings end it (and are not part of it)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [text for text in stop if text]
        self.tokens: list[int] = []
        self.emitted = ""
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the new text safe to show (may be empty). After a stop string, ``stopped`` is
        set and the text ends before it."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        cut = min((index for index in (text.find(stop) for stop in self.stop) if index >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self._emit(len(self.text))
        self.text = text
        return self._emit(self._safe_end(text))

    def finish(self) -> str:
        """The text not emitted yet, at the end of the answer (a held-back tail that did not become a stop)."""
        return self._emit(len(self.text))

    def _safe_end(self, text: str) -> int:
        end = len(text.rstrip(REPLACEMENT_CHARACTER))
        held = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, end), held, -1):
                if text[:end].endswith(stop[:length]):
                    held = length
                    break
        return end - held

    def _emit(self, end: int) -> str:
        # Re-decoding may rarely change text already shown (a merge across tokens): show nothing until it agrees.
        if end <= len(self.emitted) or not self.text.startswith(self.emitted):
            return ""
        delta = self.text[len(self.emitted) : end]
        self.emitted += delta
        return delta
