"""The Aligner step as a LangGraph node, and a helper that inserts it into an existing graph.

``aligner_node`` judges the last AI answer in ``messages`` with :class:`AlignerRunnable` and
returns a :class:`~langgraph.types.Command`: go on to the next node (the answer replaced in place,
same id, with its decision record attached), or go back to the LLM node with a feedback message
(a re-ask through the graph, so the LLM node's tools and prompts apply). The re-ask counter lives
in graph state (``aligner_reasks``), so it survives checkpoints and is bounded per answer.

``add_aligner_step`` copies a user's graph builder and puts the step after any node, including
one whose outgoing edge is conditional (the tool-calling agent loop): the node's outgoing edges
move to a pass-through exit node that runs after the Aligner, so the user's router still decides
where an aligned answer or a tool-call turn goes. Limits: a node that routes by returning
``Command(goto=...)`` or ``Send`` bypasses the step (those jumps are not edges and cannot be
moved), and the helper reads builder attributes (``nodes``, ``edges``, ``branches``) that
LangGraph does not document as stable API.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage, RemoveMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.errors import NodeError
from langgraph.graph import END, StateGraph
from langgraph.types import Command, RetryPolicy
from typing_extensions import NotRequired, TypedDict

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.correctors.base import Corrector
from aligner_chain.errors import AlignerError, ConfigurationError, InputError, RefusedError
from aligner_chain.inputs import parse_messages
from aligner_chain.record import DecisionRecord, Route
from aligner_chain.routing import RouteRule, RoutingPolicy
from aligner_chain.runnable import AlignerRunnable
from aligner_chain.types import Correction, QAPair, Verdict

logger = logging.getLogger(__name__)

REASK_KEY = "aligner_reasks"
"""The state key counting graph re-asks for the current answer (reset when an answer passes)."""

FEEDBACK_FLAG = "aligner_feedback"
"""Set in ``response_metadata`` of the feedback HumanMessage, so the next judgement skips it
when looking for the user's question."""

_REASK_ERROR = "aligner_reask_error"
"""Carried on a flagged answer, from the LLM node's error handler to the next judgement."""


class AlignerNodeState(TypedDict):
    """What the node reads. ``messages`` is declared without a reducer so that it merges with
    whatever reducer the user's state uses; the counter channel is added to the graph."""

    messages: list[AnyMessage]
    aligner_reasks: NotRequired[int]


class AlignerStageError(AlignerError):
    """A classifier or corrector failed inside the node while a ``RetryPolicy`` is set.

    Raised so that LangGraph retries the node; when the retries run out, the node's error
    handler applies the answer the policy's ``on_error`` produced (kept or refused), carried here.
    """

    def __init__(self, message: AIMessage, record: DecisionRecord) -> None:
        super().__init__("; ".join(record.errors) or "an Aligner stage failed")
        self.message = message
        self.record = record


@dataclass
class _Call:
    """One judgement: the aligner configured for this call, and the re-ask it captured."""

    aligner: AlignerRunnable
    reask: list[tuple[QAPair, Verdict]] = field(default_factory=list)


class AlignerNode(Runnable[dict[str, Any], Command]):
    """A LangGraph node running the Aligner step on the last AI answer in ``messages``.

    - The last message is not an AI answer (empty list, a human or tool message last) or it
      carries tool calls: nothing to judge; go to ``next_node``, state unchanged.
    - Skip / correct / refuse: the answer is replaced in place (same id) with the record in
      ``response_metadata["aligner"]``; go to ``next_node``. An answer left unchanged keeps its
      original content blocks (images, citations), not only their text.
    - Re-ask while the graph's budget lasts: the answer gets its record (route ``reask``), a
      feedback HumanMessage follows it, and the graph goes back to ``llm_node``. Once the budget
      is spent a re-ask route becomes a correction, as in :class:`AlignerRunnable`.
    - An answer that cannot be judged (no human turn before it, no text blocks) or an unexpected
      failure: the policy's ``on_error`` applies (``fail_open`` keeps the answer,
      ``fail_closed`` refuses) and the record holds the error. ``RefusedError`` (``fallback=
      "raise"``) and ``ConfigurationError`` propagate.

    Add it with :meth:`add_to`, which also wires ``retry_policy`` and the error handler, and
    give the LLM node ``error_handler=node.upstream_error_handler`` so that a failed re-ask call
    does not lose the flagged answer.
    """

    def __init__(
        self,
        aligner: AlignerRunnable,
        *,
        llm_node: str | None = "llm",
        next_node: str = END,
        max_reasks: int | None = None,
        retry_policy: RetryPolicy | None = None,
        context_key: str | None = None,
    ) -> None:
        # The graph re-asks, not the runnable; the node records once the route is final.
        self.recording = aligner
        self.aligner = aligner.model_copy(update={"upstream": None, "recorder": None})
        self.policy = aligner.policy
        self.llm_node = llm_node
        self.next_node = next_node
        self.max_reasks = self.policy.max_reasks if max_reasks is None else max_reasks
        self.retry_policy = retry_policy
        self.context_key = context_key
        self.name = "aligner"

    def add_to(self, builder: StateGraph, name: str = "aligner") -> StateGraph:
        """Add this node to ``builder`` with its retry policy, error handler and destinations."""
        self.name = name
        schema: Any = AlignerNodeState
        if self.context_key is not None:
            fields = {
                **get_type_hints(AlignerNodeState, include_extras=True),
                self.context_key: NotRequired[Any],
            }
            schema = TypedDict(f"AlignerNodeState_{self.context_key}", fields)  # type: ignore[misc]
        return builder.add_node(
            name,
            self,
            input_schema=schema,
            retry_policy=self.retry_policy,
            error_handler=self.handle_error,
            destinations=tuple(d for d in (self.next_node, self.llm_node) if d is not None),
        )

    # -- running -----------------------------------------------------------------------------

    def invoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Command:
        answer = _answer(input)
        if answer is None:
            return Command(goto=self.next_node)
        call = self._call(input)
        try:
            result = call.aligner.invoke(self._input(input), config)
        except InputError as exc:
            return self._unjudged(answer, exc)
        draft = self._draft(call, config) if self._wants_draft(call) else None
        return self._finish(input, answer, result, call, draft)

    async def ainvoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Command:
        answer = _answer(input)
        if answer is None:
            return Command(goto=self.next_node)
        call = self._call(input)
        try:
            result = await call.aligner.ainvoke(self._input(input), config)
        except InputError as exc:
            return self._unjudged(answer, exc)
        draft = await self._adraft(call, config) if self._wants_draft(call) else None
        return self._finish(input, answer, result, call, draft)

    def handle_error(self, state: dict[str, Any], error: NodeError) -> Command:
        """LangGraph's error handler for this node: runs once its retries are exhausted."""
        exc = error.error
        if isinstance(exc, AlignerStageError):
            self.recording.record_decisions([exc.record])
            return self._pass(exc.message)
        answer = _answer(state)
        if isinstance(exc, (RefusedError, ConfigurationError)) or answer is None:
            raise exc
        logger.warning("the Aligner node failed; on_error=%s", self.policy.on_error, exc_info=exc)
        return self._unjudged(answer, exc)

    def upstream_error_handler(self, state: dict[str, Any], error: NodeError) -> Command:
        """An error handler for the LLM node (``error_handler=node.upstream_error_handler``).

        When a re-ask call fails, the feedback is withdrawn and the flagged answer goes back to
        this node with the re-ask budget spent, so it is corrected (or refused) instead of
        being lost with the run. Any other failure of the LLM node propagates unchanged.
        """
        messages = state.get("messages") or []
        if len(messages) < 2 or not messages[-1].response_metadata.get(FEEDBACK_FLAG):
            raise error.error
        flagged = messages[-2]
        why = f"{type(error.error).__name__}: {error.error}"
        meta = {**flagged.response_metadata, _REASK_ERROR: why}
        return Command(
            goto=self.name,
            update={
                "messages": [
                    RemoveMessage(id=messages[-1].id),
                    flagged.model_copy(update={"response_metadata": meta}),
                ],
                REASK_KEY: self.max_reasks,
            },
        )

    # -- steps -------------------------------------------------------------------------------

    def _input(self, state: dict[str, Any]) -> list[BaseMessage] | dict[str, Any]:
        """The runnable's input: the conversation, or a pair with the retrieved context."""
        messages = _judged(state["messages"])
        if self.context_key is None:
            return messages
        turn = parse_messages(messages)
        assert turn.pair is not None  # tool-call turns never get here
        context = _context_text(state.get(self.context_key))
        return {"question": turn.pair.question, "answer": messages[-1], "context": context}

    def _call(self, state: dict[str, Any]) -> _Call:
        """Configure the aligner for one judgement. While the graph may still re-ask, a re-ask
        route is captured (and the answer kept) instead of becoming a correction."""
        call = _Call(self.aligner)
        if (
            self.llm_node is None
            or self.policy.mode != "route"
            or state.get(REASK_KEY, 0) >= self.max_reasks
        ):
            return call
        user_rule = self.aligner.rule

        def capture(pair: QAPair, verdict: Verdict, _proposed: Route) -> Route:
            route = self.policy.decide(pair, verdict, user_rule)
            if route is Route.REASK:
                call.reask.append((pair, verdict))
                return Route.SKIP
            return route

        call.aligner = self.aligner.model_copy(update={"rule": capture})
        return call

    def _wants_draft(self, call: _Call) -> bool:
        return (
            bool(call.reask) and self.policy.reask_with_draft and self.aligner.corrector is not None
        )

    def _draft(self, call: _Call, config: RunnableConfig | None) -> str | None:
        """The corrector's draft for the re-ask feedback; a failure only shortens the feedback."""
        try:
            return _text(self.aligner.corrector.invoke([call.reask[0][0]], config))
        except Exception:
            logger.warning("the re-ask draft failed", exc_info=True)
            return None

    async def _adraft(self, call: _Call, config: RunnableConfig | None) -> str | None:
        try:
            return _text(await self.aligner.corrector.ainvoke([call.reask[0][0]], config))
        except Exception:
            logger.warning("the re-ask draft failed", exc_info=True)
            return None

    def _finish(
        self,
        state: dict[str, Any],
        answer: AIMessage,
        result: AIMessage,
        call: _Call,
        draft: str | None,
    ) -> Command:
        reasks = state.get(REASK_KEY, 0)
        record = DecisionRecord.model_validate(result.response_metadata["aligner"])
        if call.reask:
            record.route = record.initial_route = Route.REASK
            record.notes.append(f"re-asked through graph node {self.llm_node!r}")
        elif reasks:
            record.reask_count = reasks
            if record.initial_route is Route.REASK:
                record.notes.append(f"the graph's re-ask budget ({self.max_reasks}) is spent")
        if _REASK_ERROR in answer.response_metadata:
            record.notes.append(f"the re-ask failed ({answer.response_metadata[_REASK_ERROR]})")
        message = _with_record(answer, result.content, record)
        if record.errors and self.retry_policy is not None:
            raise AlignerStageError(message, record)
        self.recording.record_decisions([record])  # the runnable's recorder and its error handling
        if call.reask:
            feedback = HumanMessage(
                self.policy.feedback(call.reask[0][1], draft),
                response_metadata={FEEDBACK_FLAG: True},
            )
            return Command(
                goto=self.llm_node,
                update={"messages": [message, feedback], REASK_KEY: reasks + 1},
            )
        return self._pass(message)

    def _pass(self, message: AIMessage) -> Command:
        return Command(goto=self.next_node, update={"messages": [message], REASK_KEY: 0})

    def _unjudged(self, answer: AIMessage, exc: BaseException) -> Command:
        """Apply ``on_error`` to an answer the step could not judge."""
        return self._pass(self.recording.unjudged("", answer, exc))


def aligner_node(
    aligner: AlignerRunnable | None = None,
    *,
    classifier: HarmClassifier | None = None,
    corrector: Corrector | None = None,
    policy: RoutingPolicy | None = None,
    rule: RouteRule | None = None,
    recorder: Any = None,
    llm_node: str | None = "llm",
    next_node: str = END,
    max_reasks: int | None = None,
    retry_policy: RetryPolicy | None = None,
    context_key: str | None = None,
) -> AlignerNode:
    """The Aligner step as a LangGraph node (see :class:`AlignerNode`).

    Pass an :class:`AlignerRunnable` or its parts. ``llm_node`` is where a re-ask goes
    (``None`` turns re-asks into corrections); ``next_node`` is where every other answer goes.
    ``max_reasks`` defaults to the policy's. With a ``retry_policy``, a failed classifier or
    corrector makes LangGraph retry the node before ``on_error`` applies. ``context_key`` names
    a state key holding retrieved context (text or documents) for grounded correction (pair it
    with the ``aligner-rag`` template). Add the node with ``node.add_to(builder, "aligner")`` so
    its error handler is wired.
    """
    return AlignerNode(
        _aligner(aligner, classifier, corrector, policy, rule, recorder),
        llm_node=llm_node,
        next_node=next_node,
        max_reasks=max_reasks,
        retry_policy=retry_policy,
        context_key=context_key,
    )


def add_aligner_step(
    graph_or_builder: Any,
    after: str = "llm",
    aligner: AlignerRunnable | None = None,
    *,
    name: str = "aligner",
    reask: bool = True,
    classifier: HarmClassifier | None = None,
    corrector: Corrector | None = None,
    policy: RoutingPolicy | None = None,
    rule: RouteRule | None = None,
    recorder: Any = None,
    max_reasks: int | None = None,
    retry_policy: RetryPolicy | None = None,
    context_key: str | None = None,
) -> StateGraph:
    """A copy of a graph's builder with the Aligner step inserted after node ``after``.

    The user's graph and builder are not modified; compile the result yourself (with your
    checkpointer). The new wiring is ``after -> name -> name_exit``; ``name_exit`` is a
    pass-through node that takes over every outgoing edge of ``after``, conditional ones
    included, so tool-call turns reach the user's router unchanged. A re-ask goes back to
    ``after`` (``reask=False`` turns re-asks into corrections). If ``after`` has no error
    handler of its own, it gets :meth:`AlignerNode.upstream_error_handler`, so a failed re-ask
    call corrects the flagged answer instead of losing it (its retry policy still runs first).

    Raises :class:`ConfigurationError` when ``after`` is missing, a name is taken, or ``after``
    declares ``Command`` destinations: jumps made by ``Command(goto=...)`` or ``Send`` are not
    edges, so they would bypass the step. For ``create_agent`` graphs use ``AlignerMiddleware``.
    """
    source = getattr(graph_or_builder, "builder", graph_or_builder)
    if not isinstance(source, StateGraph):
        raise ConfigurationError(
            f"expected a StateGraph or a compiled graph, got {type(graph_or_builder).__name__}"
        )
    if after not in source.nodes:
        raise ConfigurationError(f"the graph has no node {after!r}: {sorted(source.nodes)}")
    exit_name = f"{name}_exit"
    taken = [n for n in (name, exit_name) if n in source.nodes]
    if taken:
        raise ConfigurationError(f"node name(s) {taken} already exist; pass another name=")
    if source.nodes[after].ends:
        raise ConfigurationError(
            f"node {after!r} routes by returning Command (destinations "
            f"{list(source.nodes[after].ends)}); those jumps would bypass the Aligner step"
        )
    builder = _copy_builder(source)
    node = aligner_node(
        aligner,
        classifier=classifier,
        corrector=corrector,
        policy=policy,
        rule=rule,
        recorder=recorder,
        llm_node=after if reask else None,
        next_node=exit_name,
        max_reasks=max_reasks,
        retry_policy=retry_policy,
        context_key=context_key,
    )
    node.add_to(builder, name)
    builder.add_node(exit_name, _pass_on)
    if reask and builder.nodes[after].error_handler_node is None:
        _readd_with_handler(builder, after, node.upstream_error_handler)
    moved = {(s, t) for s, t in builder.edges if s == after}
    builder.edges = (builder.edges - moved) | {(exit_name, t) for _, t in moved} | {(after, name)}
    if after in builder.branches:
        builder.branches[exit_name] = builder.branches.pop(after)
    builder.waiting_edges = {
        (tuple(exit_name if s == after else s for s in starts), end)
        for starts, end in builder.waiting_edges
    }
    return builder


# -- helpers ---------------------------------------------------------------------------------


def _aligner(
    aligner: AlignerRunnable | None,
    classifier: HarmClassifier | None,
    corrector: Corrector | None,
    policy: RoutingPolicy | None,
    rule: RouteRule | None,
    recorder: Any,
) -> AlignerRunnable:
    parts = {
        "classifier": classifier,
        "corrector": corrector,
        "policy": policy,
        "rule": rule,
        "recorder": recorder,
    }
    given = {k: v for k, v in parts.items() if v is not None}
    if aligner is None:
        return AlignerRunnable(**given)
    if not isinstance(aligner, AlignerRunnable):
        raise ConfigurationError(
            f"aligner must be an AlignerRunnable, got {type(aligner).__name__}"
        )
    if given:
        raise ConfigurationError(f"pass an AlignerRunnable or its parts, not both: {sorted(given)}")
    return aligner


def _answer(state: dict[str, Any]) -> AIMessage | None:
    """The AI answer to judge: the last message, unless it is a tool-call turn."""
    messages = state.get("messages") or []
    last = messages[-1] if messages else None
    if not isinstance(last, AIMessage) or last.tool_calls or last.invalid_tool_calls:
        return None
    return last


def _judged(messages: list[BaseMessage]) -> list[BaseMessage]:
    """The conversation without the step's own feedback turns, so the question stays the
    user's."""
    return [m for m in messages if not m.response_metadata.get(FEEDBACK_FLAG)]


def _context_text(value: Any) -> str | None:
    """Retrieved context as text: a string, or documents/strings joined by blank lines."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, (list, tuple)):
        return "\n\n".join(getattr(v, "page_content", v) for v in value) or None
    raise InputError(f"context must be text or a list of documents, got {type(value).__name__}")


def _with_record(answer: AIMessage, content: Any, record: DecisionRecord) -> AIMessage:
    """``answer`` (same id, so ``add_messages`` replaces it) with its record attached."""
    meta = {k: v for k, v in answer.response_metadata.items() if k != _REASK_ERROR}
    meta["aligner"] = record.to_metadata()
    return answer.model_copy(
        update={"content": content if record.changed else answer.content, "response_metadata": meta}
    )


def _text(corrections: list[Correction]) -> str | None:
    return None if corrections[0].empty else corrections[0].text


def _pass_on(state: dict[str, Any]) -> None:
    """The exit of an inserted step: the user's original edges and router start here."""
    return None


def _readd_with_handler(builder: StateGraph, name: str, handler: Any) -> None:
    """Add node ``name`` again, unchanged but for the error handler (add_node creates its
    handler node; there is no public way to set one on an existing node)."""
    spec = builder.nodes.pop(name)
    builder.add_node(
        name,
        spec.runnable,
        metadata=spec.metadata,
        input_schema=spec.input_schema,
        retry_policy=spec.retry_policy,
        cache_policy=spec.cache_policy,
        error_handler=handler,
        destinations=spec.ends or None,
        defer=spec.defer,
        timeout=spec.timeout,
        trace_policy=spec.trace_policy,
    )


def _copy_builder(source: StateGraph) -> StateGraph:
    """A builder sharing node actions with ``source`` but none of its mutable containers."""
    builder = copy.copy(source)
    builder.nodes = dict(source.nodes)
    builder.edges = set(source.edges)
    builder.branches = defaultdict(dict, {k: dict(v) for k, v in source.branches.items()})
    builder.waiting_edges = set(source.waiting_edges)
    builder.schemas = dict(source.schemas)
    builder.channels = dict(source.channels)
    builder.managed = dict(source.managed)
    builder._node_defaults = copy.copy(source._node_defaults)
    builder.compiled = False
    return builder
