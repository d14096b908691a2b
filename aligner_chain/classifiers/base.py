"""The harm-classifier interface: (question, answer) pairs in, verdicts out."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from langchain_core.runnables.config import run_in_executor

from aligner_chain.components import PairBatchRunnable
from aligner_chain.types import QAPair, Verdict


class HarmClassifier(PairBatchRunnable[Verdict]):
    """Scores how likely an answer is harmful *given its question*.

    A refusal to a harmful question is not harmful; compliance with it is. Subclasses implement
    :meth:`classify` (and may override :meth:`aclassify` with a native async path).
    """

    classifier_id: str = "classifier"
    default_bands: dict[str, float | None] | None = None
    """Routing bands fitted for this classifier's scores (``correct_at``, ``reask_at``,
    ``refuse_at``); :class:`~aligner_chain.AlignerRunnable` uses them when no policy is given."""

    @abstractmethod
    def classify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        """Score a batch of pairs; returns one :class:`Verdict` per pair, in order."""

    async def aclassify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        """Async variant; the default runs :meth:`classify` in a worker thread."""
        return await run_in_executor(None, self.classify, pairs)

    def _run_batch(self, pairs: list[QAPair]) -> list[Verdict]:
        return self.classify(pairs)

    async def _arun_batch(self, pairs: list[QAPair]) -> list[Verdict]:
        return await self.aclassify(pairs)


class BatchedHarmClassifier(HarmClassifier):
    """A model-backed classifier whose concurrent calls share forward passes.

    Subclasses build ``self.batcher = make_runner(self._classify_batch, batching)`` (see
    :mod:`aligner_chain.batching`) and implement :meth:`_classify_batch`.
    """

    batcher: Any

    @abstractmethod
    def _classify_batch(self, pairs: list[QAPair]) -> list[Verdict]:
        """Score one (possibly coalesced) batch with the model."""

    def classify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        return self.batcher(pairs)

    async def aclassify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        return await self.batcher.acall(pairs)
