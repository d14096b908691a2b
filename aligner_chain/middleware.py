"""``AlignerMiddleware``: the Aligner step for ``langchain.agents.create_agent``.

It judges the agent's answers with the same logic as the LangGraph node
(:func:`~aligner_chain.graph.aligner_node`): tool-call turns pass, answers are skipped,
corrected or refused with their decision record, and a re-ask jumps back to the model with a
feedback message, at most ``max_reasks`` times per answer.

Streaming: the middleware runs after the model node, so with ``stream_mode="messages"`` the raw
tokens reach the client before the verdict. Use :class:`~aligner_chain.AlignedChatModel` as the
agent's model where the raw answer must never be shown.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from langchain_core.messages import AnyMessage, RemoveMessage
from langchain_core.runnables import RunnableConfig
from langgraph.constants import TAG_NOSTREAM
from langgraph.graph import END
from langgraph.runtime import Runtime
from langgraph.types import Command
from typing_extensions import NotRequired

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.correctors.base import Corrector
from aligner_chain.errors import ConfigurationError
from aligner_chain.graph import REASK_KEY, AlignerNode, aligner_node
from aligner_chain.routing import RouteRule, RoutingPolicy
from aligner_chain.runnable import AlignerRunnable

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

    @property
    def name(self) -> str:
        return self._name or type(self).__name__

    # Both hooks exist so that ``when`` can be chosen per instance (create_agent wires hooks
    # by class); the one not chosen returns at once.

    @hook_config(can_jump_to=["model"])
    def after_model(self, state: AlignerAgentState, runtime: Runtime) -> dict[str, Any] | None:
        if self.when != "after_model":
            return None
        return self._update(state, self.node.invoke(self._view(state), _HIDDEN))

    @hook_config(can_jump_to=["model"])
    async def aafter_model(
        self, state: AlignerAgentState, runtime: Runtime
    ) -> dict[str, Any] | None:
        if self.when != "after_model":
            return None
        return self._update(state, await self.node.ainvoke(self._view(state), _HIDDEN))

    @hook_config(can_jump_to=["model"])
    def after_agent(self, state: AlignerAgentState, runtime: Runtime) -> dict[str, Any] | None:
        if self.when != "after_agent":
            return None
        return self._update(state, self.node.invoke(self._view(state), _HIDDEN))

    @hook_config(can_jump_to=["model"])
    async def aafter_agent(
        self, state: AlignerAgentState, runtime: Runtime
    ) -> dict[str, Any] | None:
        if self.when != "after_agent":
            return None
        return self._update(state, await self.node.ainvoke(self._view(state), _HIDDEN))

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
