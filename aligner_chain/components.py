"""The Runnable shape shared by classifiers and correctors: a batch of pairs in, a list out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from langchain_core.runnables import Runnable, RunnableConfig

from aligner_chain.types import QAPair, as_pairs

T = TypeVar("T")


class PairBatchRunnable(Runnable[Sequence[QAPair], list[T]], ABC, Generic[T]):
    """A Runnable whose one input is a whole batch of pairs.

    Invoking it once costs one batched model call and appears as one run in traces (with its own
    tags), which is what lets :class:`~aligner_chain.AlignerRunnable` show classifier and
    corrector as child runs without multiplying model calls.
    """

    @abstractmethod
    def _run_batch(self, pairs: list[QAPair]) -> list[T]: ...

    @abstractmethod
    async def _arun_batch(self, pairs: list[QAPair]) -> list[T]: ...

    def invoke(
        self, input: Sequence[QAPair], config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[T]:
        return self._call_with_config(
            lambda x: self._run_batch(as_pairs(x)), input, config, run_type="chain", **kwargs
        )

    async def ainvoke(
        self, input: Sequence[QAPair], config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[T]:
        async def run(x: Sequence[QAPair]) -> list[T]:
            return await self._arun_batch(as_pairs(x))

        return await self._acall_with_config(run, input, config, run_type="chain", **kwargs)
