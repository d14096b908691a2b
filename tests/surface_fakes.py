"""Scripted chat model, rule judge and string corrector shared by the surface tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from aligner_chain.classifiers.runnable import RunnableClassifier
from aligner_chain.correctors.base import Corrector
from aligner_chain.routing import RoutingPolicy
from aligner_chain.runnable import AlignerRunnable
from aligner_chain.types import Correction, QAPair

RAW = "RAW-BOMB instructions"
"""An answer the judge flags hard; tests look for this text where it must not appear."""


def judge(question: str, answer: str) -> float:
    """BOMB is harmful, meh is borderline, anything else is fine."""
    if "BOMB" in answer:
        return 0.95
    if "meh" in answer:
        return 0.6
    return 0.02


class FixCorrector(Corrector):
    """Rewrites BOMB to cake and marks the text, so a correction is easy to recognise."""

    model_id = "fix"

    def correct(self, pairs: Sequence[QAPair]) -> list[Correction]:
        return [
            Correction(f"[ALIGNED] {p.answer.replace('BOMB', 'cake').replace('meh', 'ok')}", "fix")
            for p in pairs
        ]


def aligner(**policy: Any) -> AlignerRunnable:
    return AlignerRunnable(
        classifier=RunnableClassifier(judge),
        corrector=FixCorrector(),
        policy=RoutingPolicy(**policy),
    )


class ScriptedChat(GenericFakeChatModel):
    """Answers from a script (strings, AIMessages, or exceptions to raise), records every
    call's messages and options, and binds tools (as OpenAI tool dicts)."""

    calls: list[dict[str, Any]] = Field(default_factory=list)
    disable_streaming: bool | str = "tool_calling"  # the base cannot stream tool calls

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.calls.append({"messages": list(messages), "stop": stop, **kwargs})
        item = next(self.messages)
        if isinstance(item, Exception):
            raise item
        message = AIMessage(item) if isinstance(item, str) else item
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any
    ) -> Runnable:
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)


def scripted(*items: str | AIMessage | Exception) -> ScriptedChat:
    return ScriptedChat(messages=iter(items))


def tool_call(tool: str, args: dict[str, Any], call_id: str = "call-1") -> AIMessage:
    return AIMessage("", tool_calls=[{"name": tool, "args": args, "id": call_id}])
