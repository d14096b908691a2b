"""Incremental sentence splitting for guarded streaming.

Text arrives in arbitrary deltas; :class:`SentenceBuffer` hands out complete units (sentences,
or whole fenced code blocks) as soon as they are known to be complete, and forces a unit out
when the pending text grows past a character or time limit. Splitting is done by
`sentencex <https://pypi.org/project/sentencex/>`_ (abbreviations, decimals, ~300 languages,
including ones written without spaces); code fences and list markers are handled here. The
concatenation of every unit handed out always equals the text fed in.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from sentencex import segment

_FENCE = re.compile(r"```.*?```\n?", re.DOTALL)
_LIST_MARKER = re.compile(r"\s*(?:\d{1,3}|[A-Za-z]|[ivxIVX]{1,4})[.)]\s*")


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Split text into units whose concatenation is ``text``.

    Closed code fences stay whole; a bare list marker ("1. ") is joined to the item after it.
    """
    units: list[str] = []
    position = 0
    for fence in _FENCE.finditer(text):
        units.extend(_prose(text[position : fence.start()], language))
        units.append(fence.group())
        position = fence.end()
    units.extend(_prose(text[position:], language))
    return units


def _prose(text: str, language: str) -> list[str]:
    if not text:
        return []
    pieces = [p for p in segment(language, text) if p]
    if "".join(pieces) != text:  # never lose or alter text, whatever the segmenter does
        pieces = [text]
    merged: list[str] = []
    for piece in pieces:
        if merged and _LIST_MARKER.fullmatch(merged[-1]):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


class SentenceBuffer:
    """Accumulates deltas and releases complete units.

    A unit is complete when the splitter finds another unit after it, or when a code fence
    closes. Pending text longer than ``max_chars``, or older than ``max_ms``, is forced out (cut
    at the last space within the limit when there is one), so hold-back is bounded.
    """

    def __init__(
        self,
        language: str = "en",
        max_chars: int = 600,
        max_ms: float = 3000.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.language, self.max_chars, self.max_ms, self.clock = (
            language,
            max_chars,
            max_ms,
            clock,
        )
        self.pending = ""
        self.since: float | None = None

    def feed(self, delta: str) -> list[str]:
        """Add text; return the units that are now complete (possibly none)."""
        if delta and self.since is None:
            self.since = self.clock()
        self.pending += delta
        if self.pending.count("```") % 2 == 1:
            # An open code fence starts a unit that is complete only when it closes; the text
            # before it is complete already.
            ready = split_sentences(self.pending[: self.pending.rfind("```")], self.language)
        else:
            ready = split_sentences(self.pending, self.language)[:-1]
        self._take(ready)
        return ready + self._forced()

    def flush(self) -> list[str]:
        """The rest of the text, as final units (at the end of the stream)."""
        units = split_sentences(self.pending, self.language) if self.pending else []
        self.pending, self.since = "", None
        return units

    def overdue(self) -> bool:
        """Whether pending text has waited longer than ``max_ms``."""
        return (
            bool(self.pending)
            and self.since is not None
            and ((self.clock() - self.since) * 1000 >= self.max_ms)
        )

    def force(self) -> list[str]:
        """Release the pending text now (used when it is overdue)."""
        if not self.pending:
            return []
        unit, self.pending, self.since = self.pending, "", None
        return [unit]

    def _take(self, units: list[str]) -> None:
        taken = sum(len(u) for u in units)
        if taken:  # the hold-back clock restarts only when text was released
            self.pending = self.pending[taken:]
            self.since = self.clock() if self.pending else None

    def _forced(self) -> list[str]:
        if len(self.pending) > self.max_chars:
            cut = self.pending.rfind(" ", 0, self.max_chars) + 1 or self.max_chars
            unit = self.pending[:cut]
            self._take([unit])
            return [unit]
        if self.overdue():
            return self.force()
        return []
