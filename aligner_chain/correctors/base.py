"""The corrector interface: (question, answer) pairs in, corrected answers out."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.runnables.config import run_in_executor

from aligner_chain.components import PairBatchRunnable
from aligner_chain.types import Correction, QAPair


class Corrector(PairBatchRunnable[Correction]):
    """Rewrites answers to be more helpful and harmless.

    Subclasses implement :meth:`correct`; async and streaming fall back to defaults built on it.
    """

    model_id: str = "corrector"

    @property
    def cache_identity(self) -> dict[str, Any]:
        """What decides the corrections besides the input: part of the cache key of
        :class:`~aligner_chain.AlignedChatModel`, so that answers corrected under other
        settings are never served from a shared cache."""
        return {"model_id": self.model_id}

    @abstractmethod
    def correct(self, pairs: Sequence[QAPair]) -> list[Correction]:
        """Correct a batch of pairs; returns one :class:`Correction` per pair, in order."""

    async def acorrect(self, pairs: Sequence[QAPair]) -> list[Correction]:
        """Async variant; the default runs :meth:`correct` in a worker thread."""
        return await run_in_executor(None, self.correct, pairs)

    def stream_correction(self, pair: QAPair) -> Iterator[str | Correction]:
        """Yield text deltas of one correction, then the complete :class:`Correction`.

        The default produces the whole correction and yields it as a single delta.
        """
        result = self.correct([pair])[0]
        if result.text and not result.empty:
            yield result.text
        yield result

    async def astream_correction(self, pair: QAPair) -> AsyncIterator[str | Correction]:
        """Async variant of :meth:`stream_correction`; the default drives it in a thread."""
        iterator = iter(self.stream_correction(pair))
        sentinel = object()
        while True:
            item = await asyncio.to_thread(next, iterator, sentinel)
            if item is sentinel:
                return
            yield item  # type: ignore[misc]

    def _run_batch(self, pairs: list[QAPair]) -> list[Correction]:
        return self.correct(pairs)

    async def _arun_batch(self, pairs: list[QAPair]) -> list[Correction]:
        return await self.acorrect(pairs)
