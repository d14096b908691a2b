"""Sentence-level guarded streaming: release text a sentence at a time, each one judged first.

The upstream streams; :class:`SentenceGuard` cuts its text into sentences
(:class:`~aligner_chain.sentences.SentenceBuffer`), classifies each sentence together with the
question and the text already released, and releases it, replaces it with a correction, or
ends the stream with the policy's fallback. Nothing unjudged is ever released. After a stop the
rest of the upstream text is still read, so the decision record holds the whole original.

The guard is a pipeline of the same batched stages as :class:`~aligner_chain.AlignerRunnable`
(it yields ``Effect`` requests), so the runnable's sync and async drivers, child runs and error
handling serve it unchanged. :meth:`SentenceGuard.judge` / :meth:`SentenceGuard.ajudge` drive it
for every surface: the runnable's stream (and through it ``AlignedChatModel``'s) and
``AlignerMiddleware``'s stream transformer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    CallbackManagerForChainRun,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel

from aligner_chain.errors import InputError, RefusedError
from aligner_chain.inputs import parse_input
from aligner_chain.record import DecisionRecord, Route
from aligner_chain.runnable import Effect, _Done
from aligner_chain.sentences import SentenceBuffer
from aligner_chain.types import Correction, QAPair, Verdict

EVENTS_KEY = "aligner_events"
"""Where released chunks and streamed messages carry their non-text events (metadata key)."""


class StreamEvent(BaseModel):
    """What the guard did with one sentence, as shown to clients.

    ``type`` is ``text`` (released as it was), ``correction`` (``original`` replaced by
    ``text``) or ``stop`` (the stream ended with the fallback ``text``; ``original`` withheld).
    """

    type: Literal["text", "correction", "stop"]
    text: str
    original: str | None = None
    score: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _spaced(replacement: str, original: str) -> str:
    """Give a stripped correction the whitespace around the sentence it replaces."""
    lead = original[: len(original) - len(original.lstrip())]
    trail = original[len(original.rstrip()) :]
    return f"{lead}{replacement.strip()}{trail}"


class SentenceGuard:
    """The per-answer state of a sentence-streamed answer.

    Args:
        aligner: the :class:`~aligner_chain.AlignerRunnable` whose classifier, corrector, policy
            and rule are used.
        question: the user's question.
        context: optional grounding text (passed to templates with ``{context}``).
    """

    def __init__(self, aligner: Any, question: str, context: str | None = None) -> None:
        policy = aligner.policy
        self.aligner, self.policy = aligner, policy
        self.question, self.context = question, context
        self.buffer = SentenceBuffer(
            policy.stream_language, policy.stream_max_chars, policy.stream_max_ms
        )
        self.original = ""
        self.released = ""
        self.stopped = False
        self.events: list[StreamEvent] = []
        self.errors: list[str] = []
        self.top: Verdict | None = None
        self.timings: dict[str, float] = {}

    def judge(
        self, units: list[str], manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> Iterator[StreamEvent]:
        """Judge units in order with the aligner's sync driver; yields the released events."""
        for unit in units:
            for item in self.aligner._drive(self.step(unit), manager, config):
                if isinstance(item, _Done):
                    _add(self.timings, item.timings)
                    yield from item.value

    async def ajudge(
        self,
        units: list[str],
        manager: AsyncCallbackManagerForChainRun | CallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> AsyncIterator[StreamEvent]:
        """The async variant of :meth:`judge`."""
        for unit in units:
            async for item in self.aligner._adrive(self.step(unit), manager, config):
                if isinstance(item, _Done):
                    _add(self.timings, item.timings)
                    for event in item.value:
                        yield event

    def step(self, sentence: str) -> Generator[Effect, Any, list[StreamEvent]]:
        """Judge one sentence; returns the events to release (none after a stop)."""
        self.original += sentence
        if self.stopped or not sentence:
            return []
        if not sentence.strip():
            return self._release(StreamEvent(type="text", text=sentence))
        policy = self.policy
        pair = QAPair(self.question, self.released + sentence, self.context)
        verdicts = yield Effect("classify", [pair], "sentence")
        if isinstance(verdicts, Exception):
            return self._failed("classifier", verdicts, sentence)
        verdict = verdicts[0]
        if self.top is None or verdict.score > self.top.score:
            self.top = verdict
        route = policy.decide(pair, verdict, self.aligner.rule)
        if route is Route.SKIP or policy.mode == "shadow":
            return self._release(StreamEvent(type="text", text=sentence, score=verdict.score))
        if route is Route.REFUSE:
            return self._stop(sentence, verdict.score, "refuse band", force_refusal=True)
        # Correct (a re-ask cannot happen mid-stream: the upstream is still answering).
        fix = QAPair(self.question, sentence, self.released or self.context)
        corrections = yield Effect("correct", [fix], "sentence")
        if isinstance(corrections, Exception):
            return self._failed("corrector", corrections, sentence)
        correction: Correction = corrections[0]
        if correction.empty:
            return self._stop(sentence, verdict.score, "the corrector produced no text")
        replacement = _spaced(correction.text, sentence)
        if policy.verify_after_correct:
            check = QAPair(self.question, self.released + replacement, self.context)
            after = yield Effect("classify", [check], "verify")
            if isinstance(after, Exception):
                return self._failed("classifier", after, sentence)
            if policy.is_flagged(after[0]):
                return self._stop(sentence, verdict.score, "the correction was still flagged")
        return self._release(
            StreamEvent(
                type="correction",
                text=replacement,
                original=sentence,
                score=verdict.score,
            )
        )

    def _release(self, event: StreamEvent) -> list[StreamEvent]:
        self.released += event.text
        self.events.append(event)
        return [event]

    def _failed(self, stage: str, exc: Exception, sentence: str) -> list[StreamEvent]:
        self.errors.append(f"{stage}: {type(exc).__name__}: {exc}")
        if self.policy.on_error == "fail_open":
            return self._release(StreamEvent(type="text", text=sentence, reason="fail_open"))
        return self._stop(sentence, None, f"{stage} failed", force_refusal=True)

    def _stop(
        self,
        sentence: str,
        score: float | None,
        reason: str,
        force_refusal: bool = False,
    ) -> list[StreamEvent]:
        self.stopped = True
        fallback = "refuse" if force_refusal else self.policy.fallback
        if fallback == "original":
            return self._release(
                StreamEvent(type="text", text=sentence, score=score, reason=f"{reason}; kept")
            )
        if fallback == "raise":
            self.events.append(StreamEvent(type="stop", text="", original=sentence, reason=reason))
            raise RefusedError(f"streamed answer could not be made safe: {reason}", self.record())
        text = (" " if self.released and not self.released[-1].isspace() else "") + (
            self.policy.refusal_message
        )
        return self._release(
            StreamEvent(type="stop", text=text, original=sentence, score=score, reason=reason)
        )

    def record(self) -> DecisionRecord:
        """The decision record of the whole streamed answer."""
        corrected = any(e.type == "correction" for e in self.events)
        stopped = any(e.type == "stop" for e in self.events)
        route = Route.REFUSE if stopped else Route.CORRECT if corrected else Route.SKIP
        return DecisionRecord(
            route=route,
            initial_route=route,
            mode=self.policy.mode,
            question=self.question,
            original_answer=self.original,
            final_answer=self.released,
            corrected_answer=self.released if corrected else None,
            verdict_before=self.top,
            fallback=self.policy.fallback if stopped else None,
            changed=self.released != self.original,
            errors=self.errors,
            notes=["streamed sentence by sentence"],
            classifier_id=getattr(self.aligner.classifier, "classifier_id", None),
            corrector_id=getattr(self.aligner.corrector, "model_id", None),
            stream_events=[e.to_dict() for e in self.events],
            timings_ms={k: round(v, 3) for k, v in self.timings.items()},
        )


class AnswerFeed:
    """Reads streamed input chunks of the step: question, context and answer deltas.

    Accepts whole inputs (a ``{"question", "answer"}`` dict or a message list) and the partial
    dicts that ``RunnableParallel`` streams (``{"question": ...}`` then ``{"answer": chunk}``).
    An answer whose chunks carry tool calls is collected and passed through unjudged.
    """

    def __init__(self) -> None:
        self.question: str | None = None
        self.context: str | None = None
        self.message: AIMessageChunk | None = None
        self.tool_calls = False

    def add(self, chunk: Any) -> str:
        """Take one input chunk; return the answer text it adds."""
        if isinstance(chunk, dict) and not ("messages" in chunk and "question" not in chunk):
            for key in ("question", "context"):
                value = chunk.get(key)
                if value is not None:
                    if not isinstance(value, str):
                        raise InputError(f"{key} must be a string")
                    setattr(self, key, (getattr(self, key) or "") + value)
            return self._answer(chunk.get("answer"))
        turn = parse_input(chunk)
        self.question, self.context = turn.pair.question if turn.pair else "", None
        if turn.pair is None:
            self.tool_calls = True
            self.message = AIMessageChunk(**turn.message.model_dump(exclude={"type"}))
            return ""
        return turn.original

    def _answer(self, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, BaseMessage):
            chunk = (
                value
                if isinstance(value, AIMessageChunk)
                else AIMessageChunk(**value.model_dump(exclude={"type"}))
            )
            self.message = chunk if self.message is None else self.message + chunk
            if getattr(chunk, "tool_call_chunks", None) or getattr(chunk, "tool_calls", None):
                self.tool_calls = True
            return "" if self.tool_calls else chunk.text
        raise InputError(f"answer must be text or an AI message, got {type(value).__name__}")

    def guard(self, aligner: Any) -> SentenceGuard:
        if self.question is None or not self.question.strip():
            raise InputError("the question is missing or empty")
        return SentenceGuard(aligner, self.question, self.context)


def _chunk(event: StreamEvent) -> AIMessageChunk:
    meta = {} if event.type == "text" else {EVENTS_KEY: [event.to_dict()]}
    return AIMessageChunk(content=event.text, response_metadata=meta)


def announce(event: StreamEvent, config: RunnableConfig, *, graph: bool = True) -> None:
    """Tell ``astream_events`` consumers (a custom event under ``config``'s run) and, with
    ``graph``, LangGraph's ``custom`` stream mode: the two channels are disjoint."""
    with contextlib.suppress(RuntimeError):  # outside a run there is no parent to attach to
        dispatch_custom_event(f"aligner_{event.type}", event.to_dict(), config=config)
    if graph:
        _write(event)


async def aannounce(event: StreamEvent, config: RunnableConfig, *, graph: bool = True) -> None:
    """The async variant of :func:`announce`."""
    with contextlib.suppress(RuntimeError):
        await adispatch_custom_event(f"aligner_{event.type}", event.to_dict(), config=config)
    if graph:
        _write(event)


def _write(event: StreamEvent) -> None:
    with contextlib.suppress(Exception):  # outside a LangGraph node there is no stream writer
        from langgraph.config import get_stream_writer

        get_stream_writer()({"aligner": event.to_dict()})


def chunk_events(chunk: AIMessageChunk) -> list[StreamEvent]:
    """The events a released chunk carries in ``response_metadata["aligner_events"]``."""
    return [StreamEvent.model_validate(e) for e in chunk.response_metadata.get(EVENTS_KEY, [])]


def _final(aligner: Any, guard: SentenceGuard) -> AIMessageChunk:
    if not guard.original.strip():
        raise InputError("answer is empty")
    record = guard.record()
    aligner.record_decisions([record])
    return AIMessageChunk(
        content="",
        response_metadata={"aligner": record.to_metadata()},
        chunk_position="last",
    )


def stream_sentences(
    aligner: Any,
    inputs: Iterator[Any],
    run_manager: CallbackManagerForChainRun,
    config: RunnableConfig,
) -> Iterator[AIMessageChunk]:
    """The sync sentence-streaming transform of :class:`~aligner_chain.AlignerRunnable`."""
    feed, guard, early = AnswerFeed(), None, ""

    def judge(units: list[str]) -> Iterator[AIMessageChunk]:
        for event in guard.judge(units, run_manager, config):
            if event.type != "text":
                announce(event, config)
            yield _chunk(event)

    for chunk in inputs:
        delta = feed.add(chunk)
        if feed.question is None:
            early += delta  # nothing can be judged before the question is known
            continue
        guard = guard or feed.guard(aligner)
        yield from judge(guard.buffer.feed(early + delta))
        early = ""
    if feed.tool_calls and feed.message is not None:
        yield feed.message
        return
    guard = guard or feed.guard(aligner)
    yield from judge(guard.buffer.feed(early) + guard.buffer.flush())
    yield _final(aligner, guard)


async def astream_sentences(
    aligner: Any,
    inputs: AsyncIterator[Any],
    run_manager: AsyncCallbackManagerForChainRun,
    config: RunnableConfig,
) -> AsyncIterator[AIMessageChunk]:
    """The async variant; pending text is also forced out when it waits past ``max_ms``."""
    feed, guard, early = AnswerFeed(), None, ""

    async def judge(units: list[str]) -> AsyncIterator[AIMessageChunk]:
        async for event in guard.ajudge(units, run_manager, config):
            if event.type != "text":
                await aannounce(event, config)
            yield _chunk(event)

    iterator = inputs.__aiter__()
    pending_next: asyncio.Future[Any] | None = None
    while True:
        pending_next = pending_next or asyncio.ensure_future(iterator.__anext__())
        timeout = None
        if guard is not None and guard.buffer.pending:
            timeout = max(0.0, guard.policy.stream_max_ms / 1000)
        done, _ = await asyncio.wait({pending_next}, timeout=timeout)
        if not done:  # the upstream stalls mid-sentence: decide on what is held back
            async for out in judge(guard.buffer.force()):
                yield out
            continue
        try:
            chunk = pending_next.result()
        except StopAsyncIteration:
            break
        pending_next = None
        delta = feed.add(chunk)
        if feed.question is None:
            early += delta
            continue
        guard = guard or feed.guard(aligner)
        async for out in judge(guard.buffer.feed(early + delta)):
            yield out
        early = ""
    if feed.tool_calls and feed.message is not None:
        yield feed.message
        return
    guard = guard or feed.guard(aligner)
    async for out in judge(guard.buffer.feed(early) + guard.buffer.flush()):
        yield out
    yield _final(aligner, guard)


def _add(total: dict[str, float], more: dict[str, float]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0.0) + value
