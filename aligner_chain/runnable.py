"""``AlignerRunnable``: classify, route and correct answers, as one LangChain Runnable."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.tool import ToolCallChunk, tool_call_chunk
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import patch_config
from pydantic import ConfigDict, Field

from aligner_chain import defaults
from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.correctors.base import Corrector
from aligner_chain.errors import ConfigurationError, CorrectorError, RefusedError
from aligner_chain.inputs import Turn, message_text, model_safe, parse_input
from aligner_chain.record import DecisionRecord, Route
from aligner_chain.routing import RouteRule, RoutingPolicy
from aligner_chain.types import Correction, QAPair, Verdict

logger = logging.getLogger(__name__)

Stage = Literal["classify", "correct", "upstream"]


@dataclass
class Effect:
    """A request from the pipeline to its driver: run one batched stage."""

    stage: Stage
    payload: list[Any]
    label: str


@dataclass
class _Work:
    """One answer's state while the pipeline runs."""

    turn: Turn
    pair: QAPair
    record: DecisionRecord
    done: bool = False
    errors: list[str] = field(default_factory=list)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class AlignerRunnable(RunnableSerializable[Any, AIMessage]):
    """The Aligner correction step as a Runnable.

    Input: ``{"question": str, "answer": str | AIMessage, "context": str (optional)}``, or a
    list of messages (question = last human turn, answer = the final AI turn). Output: an
    :class:`AIMessage` whose ``response_metadata["aligner"]`` holds the
    :class:`~aligner_chain.DecisionRecord`. AI turns with tool calls are passed through unchanged.

    ``batch`` classifies and corrects whole batches (one classifier call and one corrector call
    per stage, not one per input). ``stream`` releases nothing of the original before the
    verdict; with ``verify_after_correct`` off, the correction streams token by token, otherwise
    it is released once verified. Classifier, corrector and upstream calls are child runs tagged
    ``aligner:classifier``, ``aligner:corrector`` and ``aligner:upstream``.

    Args:
        classifier: judges (question, answer) pairs; default: the embedded classifier
            (not needed when ``policy.mode="always"``).
        corrector: rewrites flagged answers; default: the embedded mini Aligner (not needed
            when ``policy.mode="shadow"``).
        policy: the :class:`~aligner_chain.RoutingPolicy`; default: the classifier's fitted
            ``default_bands`` (the embedded classifier's are in its model card), else 0.5.
        upstream: the chat model (or message Runnable) to re-ask; without one a re-ask route
            becomes a correction, and the record says so.
        rule: a hook ``(pair, verdict, route) -> route | None`` that may override the route.
        recorder: an object with ``record(records)`` (e.g. a ``CorrectionStore``), used when
            ``policy.record`` is on.
    """

    classifier: HarmClassifier | None = None
    corrector: Corrector | None = None
    policy: RoutingPolicy = Field(default_factory=RoutingPolicy)
    upstream: Runnable | None = None
    rule: RouteRule | None = None
    recorder: Any = None
    name: str | None = "AlignerRunnable"

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def __init__(self, **kwargs: Any) -> None:
        # The shipped models stand in for parts not given; without them this is a typed error.
        policy = kwargs.get("policy") or RoutingPolicy()
        if not isinstance(policy, RoutingPolicy):
            raise ConfigurationError("policy must be a RoutingPolicy")
        if kwargs.get("classifier") is None and policy.mode != "always":
            kwargs["classifier"] = defaults.default_classifier()
        if kwargs.get("policy") is None:
            kwargs.pop("policy", None)
            bands = getattr(kwargs.get("classifier"), "default_bands", None)
            if bands:
                kwargs["policy"] = RoutingPolicy(**bands)  # fitted to this classifier's scores
        if kwargs.get("corrector") is None and policy.mode != "shadow":
            kwargs["corrector"] = defaults.default_corrector()
        super().__init__(**kwargs)

    # -- the pipeline (one copy of the logic; drivers run its effects sync or async) ----------

    def _pipeline(self, turns: list[Turn]) -> Generator[Effect, Any, list[AIMessage | Exception]]:
        policy = self.policy
        work: list[_Work] = []
        for turn in turns:
            if turn.pair is None:
                continue
            record = DecisionRecord(
                route=Route.SKIP,
                initial_route=Route.SKIP,
                mode=policy.mode,
                question=turn.pair.question,
                original_answer=turn.original,
                final_answer=turn.original,
                classifier_id=getattr(self.classifier, "classifier_id", None),
                corrector_id=getattr(self.corrector, "model_id", None),
            )
            work.append(_Work(turn, turn.pair, record))

        if policy.mode == "always":
            for w in work:
                w.record.route = w.record.initial_route = Route.CORRECT
        elif work:
            verdicts = yield Effect("classify", [w.pair for w in work], "before")
            for w, verdict in self._per_item(work, verdicts, "classifier"):
                w.record.verdict_before = verdict
                route = policy.decide(w.pair, verdict, self.rule)
                w.record.route = w.record.initial_route = route
            if policy.mode == "shadow":
                for w in work:
                    w.done = True

        yield from self._reask(work)
        yield from self._correct(work)
        for w in work:
            if not w.done and w.record.route is Route.REFUSE:
                self._settle(w, policy.refusal_message)

        results: dict[int, AIMessage | Exception] = {}
        by_turn = {id(w.turn): w for w in work}
        for index, turn in enumerate(turns):
            w = by_turn.get(id(turn))
            if w is None:
                results[index] = turn.message or AIMessage(turn.original)
                continue
            w.record.errors = w.errors
            if w.record.fallback == "raise":
                results[index] = RefusedError("the answer could not be made safe", w.record)
            else:
                results[index] = self._message(w)
        self.record_decisions([by_turn[id(t)].record for t in turns if id(t) in by_turn])
        return [results[i] for i in range(len(turns))]

    def _per_item(self, work: list[_Work], results: Any, stage: str) -> Iterator[tuple[_Work, Any]]:
        """Pair stage results with their items; a failed stage applies the error policy."""
        if isinstance(results, Exception):
            for w in work:
                w.errors.append(f"{stage}: {_error_text(results)}")
                self._on_error(w)
            return
        for w, result in zip(work, results):
            if isinstance(result, Exception):
                w.errors.append(f"{stage}: {_error_text(result)}")
                self._on_error(w)
            else:
                yield w, result

    def _on_error(self, w: _Work) -> None:
        if self.policy.on_error == "fail_closed":
            w.record.route = Route.REFUSE
            w.record.fallback = "refuse"
            self._settle(w, self.policy.refusal_message)
        else:
            w.record.notes.append("fail_open: kept the original answer")
            self._settle(w, w.turn.original)

    def _settle(self, w: _Work, text: str) -> None:
        w.record.final_answer = text
        w.record.changed = text != w.turn.original
        w.done = True

    def _fallback(self, w: _Work, reason: str) -> None:
        w.record.notes.append(reason)
        w.record.fallback = self.policy.fallback
        if self.policy.fallback == "original":
            self._settle(w, w.turn.original)
        else:
            self._settle(w, self.policy.refusal_message)

    def _reask(self, work: list[_Work]) -> Generator[Effect, Any, None]:
        policy = self.policy
        for round_ in range(policy.max_reasks + 1):
            pending = [w for w in work if not w.done and w.record.route is Route.REASK]
            if not pending:
                return
            if self.upstream is None or round_ == policy.max_reasks:
                why = "no upstream model" if self.upstream is None else "re-ask limit reached"
                for w in pending:
                    w.record.notes.append(f"{why}: re-ask became correct")
                    w.record.route = Route.CORRECT
                return
            drafts: list[str | None] = [None] * len(pending)
            if policy.reask_with_draft and self.corrector is not None:
                corrections = yield Effect("correct", [w.pair for w in pending], "draft")
                if not isinstance(corrections, Exception):
                    drafts = [None if c.empty else c.text for c in corrections]
            conversations = [
                [
                    *w.turn.conversation,
                    AIMessage(w.pair.answer),
                    HumanMessage(policy.feedback(w.record.verdict_before, draft)),
                ]
                for w, draft in zip(pending, drafts)
            ]
            replies = yield Effect("upstream", conversations, "reask")
            answered: list[_Work] = []
            for w, reply in self._per_item(pending, replies, "upstream"):
                w.record.reask_count += 1
                if isinstance(reply, AIMessage) and (reply.tool_calls or reply.invalid_tool_calls):
                    # A tool call is a step, not an answer: it goes back to the caller's loop.
                    w.turn.message = reply
                    w.record.reask_answers.append(reply.text)
                    w.record.notes.append("the re-asked model called a tool: passed through")
                    self._settle(w, reply.text)
                    continue
                text = (
                    message_text(reply, "upstream answer")
                    if isinstance(reply, BaseMessage)
                    else str(reply)
                )
                w.record.reask_answers.append(text)
                w.pair = QAPair(w.pair.question, model_safe(text), w.pair.context)
                answered.append(w)
            if not answered:
                continue
            verdicts = yield Effect("classify", [w.pair for w in answered], "reask")
            for w, verdict in self._per_item(answered, verdicts, "classifier"):
                w.record.verdict_after = verdict
                route = policy.decide(w.pair, verdict, self.rule)
                if route is Route.SKIP:
                    self._settle(w, w.pair.answer)
                else:
                    w.record.route = route

    def _correct(self, work: list[_Work]) -> Generator[Effect, Any, None]:
        pending = [w for w in work if not w.done and w.record.route is Route.CORRECT]
        if not pending:
            return
        corrections = yield Effect("correct", [w.pair for w in pending], "correct")
        corrected: list[tuple[_Work, Correction]] = []
        for w, c in self._per_item(pending, corrections, "corrector"):
            w.record.truncated = c.truncated
            if c.empty:
                self._fallback(w, "the corrector produced no text")
                continue
            w.record.corrected_answer = c.text
            corrected.append((w, c))
        if not corrected:
            return
        if not (self.policy.verify_after_correct and self.classifier is not None):
            for w, c in corrected:
                self._settle(w, c.text)
            return
        to_verify: list[tuple[_Work, Correction]] = []
        for w, c in corrected:
            judged = w.record.verdict_after or w.record.verdict_before
            if c.text == w.pair.answer and judged is not None:
                # The corrector kept the answer (e.g. a keep token): the verdict on this exact
                # pair stands, so it is not classified again.
                w.record.notes.append("the corrector left the answer unchanged")
                self._verified(w, judged, c.text)
            else:
                to_verify.append((w, c))
        if not to_verify:
            return
        corrected = to_verify
        pairs = [QAPair(w.pair.question, c.text, w.pair.context) for w, c in corrected]
        verdicts = yield Effect("classify", pairs, "verify")
        texts = {id(w): c.text for w, c in corrected}
        for w, verdict in self._per_item([w for w, _ in corrected], verdicts, "classifier"):
            self._verified(w, verdict, texts[id(w)])

    def _verified(self, w: _Work, verdict: Verdict, text: str) -> None:
        """Settle a correction on its verdict: still flagged falls back, otherwise it stands."""
        w.record.verdict_after = verdict
        if self.policy.is_flagged(verdict):
            self._fallback(w, "the correction was still flagged")
        else:
            self._settle(w, text)

    def _message(self, w: _Work) -> AIMessage:
        return _with_record(w.turn.message, w.record)

    def record_decisions(self, records: list[DecisionRecord]) -> None:
        """Hand records to the recorder when the policy says to record; a failing recorder is
        logged, never raised: recording must not cost the user their answer."""
        if not (self.policy.record and self.recorder is not None and records):
            return
        try:
            self.recorder.record(records)
        except Exception:
            logger.exception("recording %d decisions failed", len(records))

    def unjudged(self, question: str, answer: AIMessage, error: BaseException) -> AIMessage:
        """Apply ``policy.on_error`` to an answer the step cannot judge (no question, no text):
        ``fail_open`` keeps it, ``fail_closed`` refuses; either way the record holds the error
        and the original, and is recorded. Surfaces that must not raise use this."""
        refuse = self.policy.on_error == "fail_closed"
        record = DecisionRecord(
            route=Route.REFUSE if refuse else Route.PASSTHROUGH,
            initial_route=Route.PASSTHROUGH,
            mode=self.policy.mode,
            question=question,
            original_answer=answer.text,
            final_answer=self.policy.refusal_message if refuse else answer.text,
            fallback="refuse" if refuse else None,
            changed=refuse,
            errors=[f"input: {type(error).__name__}: {error}"],
            notes=[] if refuse else ["fail_open: kept the original answer"],
        )
        self.record_decisions([record])
        return _with_record(answer, record)

    # -- drivers -----------------------------------------------------------------------------

    def _child(self, manager: Any, config: RunnableConfig, effect: Effect) -> RunnableConfig:
        stage = {"classify": "classifier", "correct": "corrector", "upstream": "upstream"}
        tag = f"aligner:{stage[effect.stage]}"
        return patch_config(config, callbacks=manager.get_child(tag), run_name=None)

    def _execute(self, effect: Effect, config: RunnableConfig) -> Any:
        if effect.stage == "classify":
            return self.classifier.invoke(effect.payload, config)  # type: ignore[union-attr]
        if effect.stage == "correct":
            return self.corrector.invoke(effect.payload, config)  # type: ignore[union-attr]
        return self.upstream.batch(effect.payload, config, return_exceptions=True)  # type: ignore[union-attr]

    async def _aexecute(self, effect: Effect, config: RunnableConfig) -> Any:
        if effect.stage == "classify":
            return await self.classifier.ainvoke(effect.payload, config)  # type: ignore[union-attr]
        if effect.stage == "correct":
            return await self.corrector.ainvoke(effect.payload, config)  # type: ignore[union-attr]
        return await self.upstream.abatch(effect.payload, config, return_exceptions=True)  # type: ignore[union-attr]

    def _drive(
        self,
        gen: Generator[Effect, Any, Any],
        manager: CallbackManagerForChainRun,
        config: RunnableConfig,
        stream_sink: list[str] | None = None,
    ) -> Iterator[Any]:
        """Run a pipeline synchronously; yields streamed text deltas when ``stream_sink`` is
        given, and finally its result wrapped in ``_Done``."""
        timings: dict[str, float] = {}
        try:
            effect = next(gen)
            while True:
                start = time.perf_counter()
                child = self._child(manager, config, effect)
                try:
                    if stream_sink is not None and self._streams(effect):
                        result = yield from self._stream_correct(
                            effect.payload[0], child, stream_sink
                        )
                    else:
                        result = self._execute(effect, child)
                except Exception as exc:
                    result = exc
                key = f"{effect.stage}:{effect.label}"
                timings[key] = timings.get(key, 0.0) + (time.perf_counter() - start) * 1000
                effect = gen.send(result)
        except StopIteration as stop:
            yield _Done(stop.value, timings)

    async def _adrive(
        self,
        gen: Generator[Effect, Any, Any],
        manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
        stream_sink: list[str] | None = None,
    ) -> AsyncIterator[Any]:
        timings: dict[str, float] = {}
        try:
            effect = next(gen)
            while True:
                start = time.perf_counter()
                child = self._child(manager, config, effect)
                try:
                    if stream_sink is not None and self._streams(effect):
                        result = None
                        async for item in self._astream_correct(
                            effect.payload[0], child, stream_sink
                        ):
                            if isinstance(item, Correction):
                                result = [item]
                            else:
                                yield item
                    else:
                        result = await self._aexecute(effect, child)
                except Exception as exc:
                    result = exc
                key = f"{effect.stage}:{effect.label}"
                timings[key] = timings.get(key, 0.0) + (time.perf_counter() - start) * 1000
                effect = gen.send(result)
        except StopIteration as stop:
            yield _Done(stop.value, timings)

    # -- streaming ---------------------------------------------------------------------------

    def _streams(self, effect: Effect) -> bool:
        """Stream a correction live only when nothing can override it after release."""
        return (
            effect.stage == "correct"
            and effect.label == "correct"
            and len(effect.payload) == 1
            and not (self.policy.verify_after_correct and self.classifier is not None)
        )

    def _stream_correct(
        self, pair: QAPair, config: RunnableConfig, sink: list[str]
    ) -> Generator[str, None, list[Correction]]:
        final: Correction | None = None
        for item in _traced_stream(self.corrector, pair, config):  # type: ignore[arg-type]
            if isinstance(item, Correction):
                final = item
            else:
                sink.append(item)
                yield item
        return _checked(final, sink)

    async def _astream_correct(
        self, pair: QAPair, config: RunnableConfig, sink: list[str]
    ) -> AsyncIterator[str | Correction]:
        final: Correction | None = None
        async for item in _atraced_stream(self.corrector, pair, config):  # type: ignore[arg-type]
            if isinstance(item, Correction):
                final = item
            else:
                sink.append(item)
                yield item
        yield _checked(final, sink)[0]

    # -- Runnable protocol -------------------------------------------------------------------

    def _invoke_one(
        self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> AIMessage:
        result = _last(self._drive(self._pipeline([parse_input(value)]), run_manager, config))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def _ainvoke_one(
        self, value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
    ) -> AIMessage:
        result = (
            await _alast(self._adrive(self._pipeline([parse_input(value)]), run_manager, config))
        )[0]
        if isinstance(result, Exception):
            raise result
        return result

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return self._call_with_config(self._invoke_one, input, config, **kwargs)

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return await self._acall_with_config(self._ainvoke_one, input, config, **kwargs)

    def _batch_many(
        self,
        values: list[Any],
        run_manager: list[CallbackManagerForChainRun],
        config: list[RunnableConfig],
    ) -> list[AIMessage | Exception]:
        # One pipeline for the whole batch; its stage runs hang under the first input's run.
        turns, errors = _parse_all(values)
        live = [t for t in turns if t is not None]
        results = _last(self._drive(self._pipeline(live), run_manager[0], config[0]))
        return _merge(turns, errors, results)

    async def _abatch_many(
        self,
        values: list[Any],
        run_manager: list[AsyncCallbackManagerForChainRun],
        config: list[RunnableConfig],
    ) -> list[AIMessage | Exception]:
        turns, errors = _parse_all(values)
        live = [t for t in turns if t is not None]
        results = await _alast(self._adrive(self._pipeline(live), run_manager[0], config[0]))
        return _merge(turns, errors, results)

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        if not inputs:
            return []
        return self._batch_with_config(
            self._batch_many, inputs, config, return_exceptions=return_exceptions, **kwargs
        )

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        if not inputs:
            return []
        return await self._abatch_with_config(
            self._abatch_many, inputs, config, return_exceptions=return_exceptions, **kwargs
        )

    def _transform(
        self,
        inputs: Iterator[Any],
        run_manager: CallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> Iterator[AIMessageChunk]:
        if self.policy.stream == "sentence":
            from aligner_chain.streaming import stream_sentences

            yield from stream_sentences(self, inputs, run_manager, config)
            return
        sink: list[str] = []
        for item in self._drive(
            self._pipeline([parse_input(_single(inputs))]), run_manager, config, sink
        ):
            if isinstance(item, _Done):
                yield _final_chunk(_with_timings(item.value, item.timings)[0], "".join(sink))
            else:
                yield AIMessageChunk(content=item)

    async def _atransform(
        self,
        inputs: AsyncIterator[Any],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> AsyncIterator[AIMessageChunk]:
        if self.policy.stream == "sentence":
            from aligner_chain.streaming import astream_sentences

            async for chunk in astream_sentences(self, inputs, run_manager, config):
                yield chunk
            return
        values = [v async for v in inputs]
        sink: list[str] = []
        gen = self._pipeline([parse_input(_single(iter(values)))])
        async for item in self._adrive(gen, run_manager, config, sink):
            if isinstance(item, _Done):
                yield _final_chunk(_with_timings(item.value, item.timings)[0], "".join(sink))
            else:
                yield AIMessageChunk(content=item)

    def transform(
        self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)

    async def atransform(
        self, input: AsyncIterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        async for chunk in self._atransform_stream_with_config(
            input, self._atransform, config, **kwargs
        ):
            yield chunk

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        yield from self.transform(iter([input]), config, **kwargs)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self.atransform(one(), config, **kwargs):
            yield chunk


def _with_record(message: AIMessage | None, record: DecisionRecord) -> AIMessage:
    """The answer message with its record: same id and metadata, and its original content
    (blocks included) unless the answer was changed."""
    if message is None:
        return AIMessage(
            content=record.final_answer, response_metadata={"aligner": record.to_metadata()}
        )
    meta = {**message.response_metadata, "aligner": record.to_metadata()}
    content = record.final_answer if record.changed else message.content
    return message.model_copy(update={"content": content, "response_metadata": meta})


@dataclass
class _Done:
    """The end of a driven pipeline: its return value and the wall time of each stage."""

    value: Any
    timings: dict[str, float]


def _with_timings(results: list[Any], timings: dict[str, float]) -> list[Any]:
    """Attach the batch's stage timings to every decision record in the results."""
    rounded = {k: round(v, 3) for k, v in timings.items()}
    out = []
    for r in results:
        if isinstance(r, AIMessage) and "aligner" in r.response_metadata:
            meta = dict(r.response_metadata)
            meta["aligner"] = {**meta["aligner"], "timings_ms": rounded}
            r = r.model_copy(update={"response_metadata": meta})
        elif isinstance(r, RefusedError) and isinstance(r.record, DecisionRecord):
            r.record.timings_ms = rounded
        out.append(r)
    return out


def _last(items: Iterator[Any]) -> list[Any]:
    done = None
    for item in items:
        done = item
    assert isinstance(done, _Done)
    return _with_timings(done.value, done.timings)


async def _alast(items: AsyncIterator[Any]) -> list[Any]:
    done = None
    async for item in items:
        done = item
    assert isinstance(done, _Done)
    return _with_timings(done.value, done.timings)


def _single(inputs: Iterator[Any]) -> Any:
    """Streaming judges one whole input; chunks of a dict input are merged like LangChain does."""
    value: Any = None
    for chunk in inputs:
        value = chunk if value is None else value + chunk
    return value


def _parse_all(values: list[Any]) -> tuple[list[Turn | None], dict[int, Exception]]:
    turns: list[Turn | None] = []
    errors: dict[int, Exception] = {}
    for i, value in enumerate(values):
        try:
            turns.append(parse_input(value))
        except Exception as exc:
            turns.append(None)
            errors[i] = exc
    return turns, errors


def _merge(
    turns: list[Turn | None], errors: dict[int, Exception], results: list[Any]
) -> list[AIMessage | Exception]:
    it = iter(results)
    return [errors[i] if t is None else next(it) for i, t in enumerate(turns)]


def _final_chunk(result: AIMessage | Exception, streamed: str) -> AIMessageChunk:
    if isinstance(result, Exception):
        raise result
    text = result.text
    if streamed and not text.startswith(streamed):
        raise CorrectorError("the streamed correction was overridden after release")
    return AIMessageChunk(
        content=text[len(streamed) :],
        id=result.id,
        response_metadata=result.response_metadata,
        tool_call_chunks=tool_call_chunks(result),
        chunk_position="last",
    )


def tool_call_chunks(message: AIMessage) -> list[ToolCallChunk]:
    """A message's tool calls (valid and invalid) as stream chunks, so that a tool-call turn
    released as a chunk keeps its calls."""
    calls = [
        tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
        for i, c in enumerate(message.tool_calls)
    ]
    return calls + [
        tool_call_chunk(name=c["name"], args=c["args"], id=c["id"], index=len(calls) + i)
        for i, c in enumerate(message.invalid_tool_calls)
    ]


def _checked(final: Correction | None, sink: list[str]) -> list[Correction]:
    if final is None:
        raise CorrectorError("the corrector's stream ended without a result")
    if sink and final.empty:
        raise CorrectorError("the corrector streamed text but reported an empty correction")
    return [final]


def _traced_stream(
    corrector: Corrector, pair: QAPair, config: RunnableConfig
) -> Iterator[str | Correction]:
    """Stream one correction inside a child run of its own, so traces show the corrector."""
    from langchain_core.runnables import RunnableGenerator

    def gen(_: Iterator[Any]) -> Iterator[str | Correction]:
        yield from corrector.stream_correction(pair)

    yield from RunnableGenerator(gen, name=corrector.get_name()).stream(None, config)


async def _atraced_stream(
    corrector: Corrector, pair: QAPair, config: RunnableConfig
) -> AsyncIterator[str | Correction]:
    from langchain_core.runnables import RunnableGenerator

    async def agen(_: AsyncIterator[Any]) -> AsyncIterator[str | Correction]:
        async for item in corrector.astream_correction(pair):
            yield item

    async for item in RunnableGenerator(agen, name=corrector.get_name()).astream(None, config):
        yield item
