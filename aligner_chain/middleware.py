"""``AlignerMiddleware``: the Aligner step for ``langchain.agents.create_agent``.

It judges the agent's answers with the same logic as the LangGraph node
(:func:`~aligner_chain.graph.aligner_node`): tool-call turns pass, answers are skipped,
corrected or refused with their decision record, and a re-ask jumps back to the model with a
feedback message, at most ``max_reasks`` times per answer.

Streaming: the hooks run after the model node, so with ``stream_mode="messages"`` the raw
tokens reach the client before the verdict. With ``policy.stream="sentence"`` the middleware
also registers a stream transformer (:class:`SentenceStreamTransformer`, the mechanism of
langchain's ``PIIMiddleware``): under ``stream_events``/``astream_events(version="v3")`` the
model's text reaches the client a sentence at a time, each sentence judged first. Elsewhere use
:class:`~aligner_chain.AlignedChatModel` as the agent's model where the raw answer must never
be shown.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Literal

from langchain_core.callbacks import CallbackManager, CallbackManagerForChainRun
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    AnyMessage,
    BaseMessage,
    RemoveMessage,
)
from langchain_core.runnables import RunnableConfig
from langgraph.constants import TAG_NOSTREAM
from langgraph.graph import END
from langgraph.runtime import Runtime
from langgraph.stream import ProtocolEvent, StreamChannel, StreamTransformer
from langgraph.types import Command
from typing_extensions import NotRequired

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.correctors.base import Corrector
from aligner_chain.errors import ConfigurationError, InputError
from aligner_chain.graph import REASK_KEY, AlignerNode, _answer, _judged, _with_record, aligner_node
from aligner_chain.inputs import question_of
from aligner_chain.record import DecisionRecord
from aligner_chain.routing import RouteRule, RoutingPolicy
from aligner_chain.runnable import AlignerRunnable
from aligner_chain.streaming import EVENTS_KEY, SentenceGuard, StreamEvent

try:
    from langchain.agents.middleware import AgentMiddleware, AgentState, hook_config
    from langchain.agents.middleware.types import PrivateStateAttr
except ImportError as exc:  # langchain is the optional "agents" extra
    raise ImportError(
        "AlignerMiddleware needs langchain>=1.0: pip install 'aligner-chain[agents]'"
    ) from exc

REASKS_KEY = "aligner_middleware_reasks"
"""Private agent state: re-asks spent on the current answer, per middleware name."""

CORRECTED_ID_SUFFIX = "-aligned"
"""Appended to the id of an answer the middleware changed (see :class:`AlignerMiddleware`)."""

# The step's own classifier/corrector calls must not stream into the agent's messages stream.
_HIDDEN: RunnableConfig = {"tags": [TAG_NOSTREAM]}

_KEPT_OUTCOMES = 1024
"""Streamed outcomes waiting for their hook, at most (runs that end early never collect)."""


class AlignerAgentState(AgentState):
    """The agent state plus the re-ask counters, kept out of the agent's input and output."""

    aligner_middleware_reasks: NotRequired[Annotated[dict[str, int], PrivateStateAttr]]


class AlignerMiddleware(AgentMiddleware[AlignerAgentState, Any]):
    """Judge and correct the agent's answers (AI messages without tool calls).

    Args:
        aligner: an :class:`AlignerRunnable`, or pass its parts (``classifier``,
            ``corrector``, ``policy``, ``rule``, ``recorder``).
        when: ``"after_model"`` judges every answer the model gives; ``"after_agent"`` only the
            final one, once the agent loop ends.
        max_reasks: re-asks per answer (default: the policy's). A re-ask keeps the flagged
            answer (with its record, route ``reask``), adds a feedback HumanMessage marked in
            ``response_metadata``, and jumps back to the model; once spent, a re-ask route
            becomes a correction.
        name: the middleware's name; give each instance its own to stack several.

    Message ids: an answer left unchanged is replaced in place (same id) with its record
    attached. A changed answer (corrected or refused) is removed and re-added under
    ``<id>-aligned``, so ``stream_mode="messages"`` clients receive the correction as a whole
    message after the raw tokens (a same-id replacement is never re-emitted there). The record
    in ``response_metadata["aligner"]`` keeps the original answer either way.

    Answers that cannot be judged (no human turn, no text) follow ``policy.on_error``; errors
    raised by the model propagate unchanged.

    Sentence streaming (``policy.stream="sentence"``): the middleware's
    :class:`SentenceStreamTransformer` judges the model's streamed text under
    ``stream_events``/``astream_events(version="v3")``, and the hook then applies that outcome
    to the state (same id: the client already received the judged text) instead of judging the
    answer again, so the state holds exactly what was streamed. Runs without that transformer
    (``invoke``, ``stream(stream_mode=...)``) judge the whole answer as usual.
    """

    state_schema = AlignerAgentState

    def __init__(
        self,
        aligner: AlignerRunnable | None = None,
        *,
        classifier: HarmClassifier | None = None,
        corrector: Corrector | None = None,
        policy: RoutingPolicy | None = None,
        rule: RouteRule | None = None,
        recorder: Any = None,
        when: Literal["after_model", "after_agent"] = "after_model",
        max_reasks: int | None = None,
        name: str | None = None,
    ) -> None:
        if when not in ("after_model", "after_agent"):
            raise ConfigurationError(f"when must be 'after_model' or 'after_agent', not {when!r}")
        super().__init__()
        self.node: AlignerNode = aligner_node(
            aligner,
            classifier=classifier,
            corrector=corrector,
            policy=policy,
            rule=rule,
            recorder=recorder,
            llm_node="model",
            next_node=END,
            max_reasks=max_reasks,
        )
        self.when = when
        self._name = name
        self._streamed: dict[str, DecisionRecord] = {}
        self._lock = threading.Lock()
        if self.node.policy.stream == "sentence":
            self.transformers = (partial(SentenceStreamTransformer, middleware=self),)

    @property
    def name(self) -> str:
        return self._name or type(self).__name__

    # Both hooks exist so that ``when`` can be chosen per instance (create_agent wires hooks
    # by class); the one not chosen returns at once.

    @hook_config(can_jump_to=["model"])
    def after_model(self, state: AlignerAgentState, runtime: Runtime) -> dict[str, Any] | None:
        if self.when != "after_model":
            return None
        return self._streamed_update(state) or self._update(
            state, self.node.invoke(self._view(state), _HIDDEN)
        )

    @hook_config(can_jump_to=["model"])
    async def aafter_model(
        self, state: AlignerAgentState, runtime: Runtime
    ) -> dict[str, Any] | None:
        if self.when != "after_model":
            return None
        return self._streamed_update(state) or self._update(
            state, await self.node.ainvoke(self._view(state), _HIDDEN)
        )

    @hook_config(can_jump_to=["model"])
    def after_agent(self, state: AlignerAgentState, runtime: Runtime) -> dict[str, Any] | None:
        if self.when != "after_agent":
            return None
        return self._streamed_update(state) or self._update(
            state, self.node.invoke(self._view(state), _HIDDEN)
        )

    @hook_config(can_jump_to=["model"])
    async def aafter_agent(
        self, state: AlignerAgentState, runtime: Runtime
    ) -> dict[str, Any] | None:
        if self.when != "after_agent":
            return None
        return self._streamed_update(state) or self._update(
            state, await self.node.ainvoke(self._view(state), _HIDDEN)
        )

    # -- sentence streaming ------------------------------------------------------------------

    def keep_streamed(self, message_id: str, record: DecisionRecord) -> None:
        """Hold the transformer's outcome for a streamed answer until its hook runs."""
        with self._lock:
            self._streamed[message_id] = record
            while len(self._streamed) > _KEPT_OUTCOMES:
                del self._streamed[next(iter(self._streamed))]

    def _streamed_update(self, state: AlignerAgentState) -> dict[str, Any] | None:
        """The streamed outcome of the last answer as a hook update, if it was streamed."""
        answer = _answer(state)
        if answer is None or not answer.id:
            return None
        with self._lock:
            record = self._streamed.pop(answer.id, None)
        if record is None:
            return None
        self.node.recording.record_decisions([record])
        counts = {**(state.get(REASKS_KEY) or {}), self.name: 0}
        return {
            "messages": [_with_record(answer, record.final_answer, record)],
            REASKS_KEY: counts,
        }

    # -- state mapping -----------------------------------------------------------------------

    def _view(self, state: AlignerAgentState) -> dict[str, Any]:
        """The node's view of the agent state: this middleware's own counter."""
        counts = state.get(REASKS_KEY) or {}
        return {"messages": state["messages"], REASK_KEY: counts.get(self.name, 0)}

    def _update(self, state: AlignerAgentState, command: Command) -> dict[str, Any] | None:
        """The node's command as a hook update: counters, id policy and the jump."""
        update = command.update or {}
        if not update:
            return None  # nothing to judge (a tool-call turn, or no AI answer last)
        counts = {**(state.get(REASKS_KEY) or {}), self.name: update[REASK_KEY]}
        out: dict[str, Any] = {"messages": _with_ids(update["messages"]), REASKS_KEY: counts}
        if command.goto == "model":
            out["jump_to"] = "model"
        return out


def _with_ids(messages: list[AnyMessage]) -> list[AnyMessage]:
    """Apply the id policy: changed answers are removed and re-added under a new id."""
    out: list[AnyMessage] = []
    for message in messages:
        record = message.response_metadata.get("aligner")
        if record is not None and record["changed"] and message.id:
            out.append(RemoveMessage(id=message.id))
            message = message.model_copy(update={"id": message.id + CORRECTED_ID_SUFFIX})
        out.append(message)
    return out


_TOOL_BLOCKS = {"tool_call", "tool_call_chunk", "invalid_tool_call"}


@dataclass
class _Answer:
    """One streamed model message: its guard, traced run, and text per content block."""

    message_id: str
    guard: SentenceGuard | None  # None: nothing to judge against and on_error=fail_closed
    run: CallbackManagerForChainRun | None = None
    fed: dict[int, str] = field(default_factory=dict)
    blocks: dict[int, str] = field(default_factory=dict)
    tool_calls: bool = False

    def units(self, index: int, text: str, final: bool = False) -> list[str]:
        """Take ``text`` of block ``index``; the units now complete (all of them if final)."""
        self.fed[index] = self.fed.get(index, "") + text
        if self.guard is None:
            return []
        return self.guard.buffer.feed(text) + (self.guard.buffer.flush() if final else [])

    def release(self, index: int, events: list[StreamEvent]) -> str:
        text = "".join(e.text for e in events)
        self.blocks[index] = self.blocks.get(index, "") + text
        return text


@dataclass
class _Work:
    """Units of an answer to judge now, and what to do with the released events."""

    answer: _Answer
    units: list[str]
    apply: Callable[[list[StreamEvent]], None]


class SentenceStreamTransformer(StreamTransformer):
    """Releases the agent model's streamed text a sentence at a time, each sentence judged
    (with the question and the text already released) before it goes on.

    It runs before langgraph's built-in transformers, so every projection (``run.messages``,
    ``run.values``, the raw event log) carries judged text only: ``text-delta`` events are
    rewritten to the released text (empty while a sentence is held back), a text block's final
    text is the released text, and state snapshots show the released text in place of the raw
    answer. A flagged sentence is replaced by its correction, or the stream ends with the
    policy's fallback (``raise`` fails the run with :class:`~aligner_chain.RefusedError`).
    Corrections and stops are :class:`~aligner_chain.StreamEvent` dicts, pushed on the
    projection named after the middleware (``run.extensions["AlignerMiddleware"]``, and
    ``custom:AlignerMiddleware`` events in the raw log) and listed in the finished message's
    ``response_metadata["aligner_events"]``.

    The judging is :class:`~aligner_chain.streaming.SentenceGuard`'s. Hold-back is bounded by
    ``stream_max_chars``, and by ``stream_max_ms`` as checked when the next token arrives (a
    transformer runs only on events, so it cannot cut a stalled upstream off mid-stall). Only
    the ``model`` node at this transformer's scope is guarded; its reasoning is withheld (it is
    not judged), tool-call blocks pass through.
    """

    before_builtins = True
    supports_sync = True
    required_stream_modes = ("messages", "values")

    def __init__(self, scope: tuple[str, ...] = (), *, middleware: AlignerMiddleware) -> None:
        super().__init__(scope)
        self.middleware = middleware
        self.aligner = middleware.node.aligner
        self.channel: StreamChannel[dict[str, Any]] = StreamChannel(middleware.name)
        self._scope = list(scope)
        self._history: list[BaseMessage] = []
        self._answers: dict[str, _Answer] = {}
        self._released: dict[str, str] = {}

    def init(self) -> dict[str, Any]:
        return {self.middleware.name: self.channel}

    def process(self, event: ProtocolEvent) -> bool:
        work = self._take(event)
        if work is not None:
            guard, run = work.answer.guard, work.answer.run
            try:
                events = [] if guard is None else list(guard.judge(work.units, run, {}))
            except BaseException as exc:
                self._fail(work.answer, exc)
                raise
            self._apply(work, events)
        return True

    async def aprocess(self, event: ProtocolEvent) -> bool:
        work = self._take(event)
        if work is not None:
            guard, run = work.answer.guard, work.answer.run
            try:
                events = (
                    [] if guard is None else [e async for e in guard.ajudge(work.units, run, {})]
                )
            except BaseException as exc:
                self._fail(work.answer, exc)
                raise
            self._apply(work, events)
        return True

    # -- events ------------------------------------------------------------------------------

    def _take(self, event: ProtocolEvent) -> _Work | None:
        """Follow one event; rewrite what it carries, and return any judging it needs."""
        params = event["params"]
        data = params.get("data")
        if event["method"] != "messages":
            if event["method"] == "values" and params["namespace"] == self._scope:
                self._history = list(data.get("messages") or []) if isinstance(data, dict) else []
            if self._released:
                params["data"] = self._redacted(data)
            return None
        if params["namespace"] != self._scope or not isinstance(data, tuple) or len(data) != 2:
            return None
        payload, metadata = data
        if (metadata or {}).get("langgraph_node") != "model":
            return None
        if isinstance(payload, AIMessage) and not isinstance(payload, AIMessageChunk):
            return self._whole(payload, metadata, params)
        if not isinstance(payload, dict):
            return None
        key, kind = str(metadata.get("run_id") or ""), payload.get("event")
        if kind == "message-start":
            answer = (
                self._start(str(payload.get("id") or "")) if payload.get("role") == "ai" else None
            )
            if answer is not None:
                self._answers[key] = answer
            return None
        answer = self._answers.get(key)
        if answer is None:
            return None
        # Rewrite a copy: the model assembles its own message from the same event objects.
        payload = {k: dict(v) if isinstance(v, dict) else v for k, v in payload.items()}
        params["data"] = (payload, metadata)
        index = payload.get("index", 0)
        if kind == "content-block-delta":
            delta = payload.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "reasoning-delta":
                delta["reasoning"] = ""  # unjudged text: withheld, as AlignedChatModel drops it
            if not isinstance(delta, dict) or delta.get("type") != "text-delta":
                return None
            units = answer.units(index, delta.get("text") or "")
            delta["text"] = ""  # held back until judged

            def released(events: list[StreamEvent]) -> None:
                delta["text"] = answer.release(index, events)

            return _Work(answer, units, released)
        if kind in ("content-block-start", "content-block-finish"):
            content = payload.get("content")
            kind_of = content.get("type") if isinstance(content, dict) else None
            answer.tool_calls |= kind_of in _TOOL_BLOCKS
            if kind_of == "reasoning":
                content["reasoning"] = ""
            if kind == "content-block-start" or kind_of != "text":
                return None
            full, fed = content.get("text") or "", answer.fed.get(index, "")
            units = answer.units(index, full[len(fed) :] if full.startswith(fed) else "", True)

            def finished(events: list[StreamEvent]) -> None:
                answer.release(index, events)
                content["text"] = answer.blocks.get(index, "")

            return _Work(answer, units, finished)
        if kind == "message-finish":
            self._finish(self._answers.pop(key), payload)
        elif kind == "error":
            self._fail(answer, RuntimeError(str(payload.get("message"))))
        return None

    def _whole(self, message: AIMessage, metadata: Any, params: dict[str, Any]) -> _Work | None:
        """A model message that arrives whole (the model did not stream): judged the same way."""
        answer = self._start(message.id or "") if message.text else None
        if answer is None:
            return None
        answer.tool_calls = bool(message.tool_calls or message.invalid_tool_calls)

        def judged(events: list[StreamEvent]) -> None:
            answer.release(0, events)
            meta = self._finish(answer, None)
            content = answer.blocks.get(0, "")
            update = {
                "content": content,
                "response_metadata": {**message.response_metadata, **meta},
            }
            params["data"] = (message.model_copy(update=update), metadata)

        return _Work(answer, answer.units(0, message.text, True), judged)

    # -- answers -----------------------------------------------------------------------------

    def _start(self, message_id: str) -> _Answer | None:
        """A guard for a new model message, against the question in the latest snapshot."""
        try:
            question = question_of(_judged(self._history))
        except InputError:  # nothing to judge against: the hook applies on_error
            if self.aligner.policy.on_error == "fail_open":
                return None
            return _Answer(message_id, None)
        manager = CallbackManager.configure(inheritable_tags=[TAG_NOSTREAM])
        run = manager.on_chain_start(
            None, {"question": question}, name=f"{self.middleware.name}.stream"
        )
        return _Answer(message_id, SentenceGuard(self.aligner, question), run)

    def _apply(self, work: _Work, events: list[StreamEvent]) -> None:
        for event in events:
            if event.type != "text":
                self.channel.push(event.to_dict())
        work.apply(events)

    def _finish(self, answer: _Answer, payload: dict[str, Any] | None) -> dict[str, Any]:
        """Close an answer: its events in the finish metadata, its outcome kept for the hook."""
        guard = answer.guard
        if guard is None:
            self._released[answer.message_id] = ""
            return {}
        if answer.run is not None:
            answer.run.on_chain_end({"output": guard.released})
        if guard.original.strip():
            self._released[answer.message_id] = guard.released
            if not answer.tool_calls:
                self.middleware.keep_streamed(answer.message_id, guard.record())
        events = [e.to_dict() for e in guard.events if e.type != "text"]
        meta = {EVENTS_KEY: events} if events else {}
        if payload is not None and meta:
            payload["metadata"] = {**(payload.get("metadata") or {}), **meta}
        return meta

    def _fail(self, answer: _Answer, error: BaseException) -> None:
        self._answers = {k: a for k, a in self._answers.items() if a is not answer}
        if answer.run is not None:
            answer.run.on_chain_error(error)

    def _redacted(self, value: Any) -> Any:
        """``value`` with every guarded AI message showing its released text (a copy)."""
        if isinstance(value, AIMessage):
            text = self._released.get(value.id or "")
            if text is None or value.text == text:
                return value
            return value.model_copy(update={"content": text})
        if isinstance(value, dict):
            return {k: self._redacted(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redacted(v) for v in value]
        if type(value) is tuple:
            return tuple(self._redacted(v) for v in value)
        return value
