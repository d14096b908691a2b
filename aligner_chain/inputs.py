"""Reading the step's input: a ``{"question", "answer"}`` dict or a list of chat messages.

Both forms become a :class:`Turn`: the pair to judge, the conversation before the answer (for a
re-ask), and the original AI message (so its id and metadata survive). AI turns with tool calls
are not answers to judge: they become pass-through turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from aligner_chain.errors import InputError
from aligner_chain.types import QAPair

MAX_INPUT_CHARS = 400_000
"""Question plus answer longer than this is rejected (models truncate far earlier anyway)."""


@dataclass
class Turn:
    """One answer to judge, or one to pass through untouched (``pair is None``)."""

    pair: QAPair | None
    original: str
    message: AIMessage | None
    conversation: list[BaseMessage]


def message_text(message: BaseMessage, role: str) -> str:
    """The text of a message; non-text blocks (images, audio) are ignored.

    A message with no text at all raises :class:`InputError`: there is nothing to judge.
    """
    content = message.content
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"{role} content must be text or content blocks")
    text = message.text
    if not text.strip() and content:
        raise InputError(f"{role} message has no text blocks to judge")
    return text


def model_safe(text: str) -> str:
    """Replace lone surrogates, which tokenizers cannot encode; the original stays recorded."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _require_text(value: Any, role: str) -> str:
    if value is None:
        raise InputError(f"{role} is missing")
    if not isinstance(value, str):
        raise InputError(f"{role} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{role} is empty")
    return value


def _turn(question: str, answer: Any, context: Any, history: list[BaseMessage]) -> Turn:
    message: AIMessage | None = None
    if isinstance(answer, AIMessage):
        message = answer
        if answer.tool_calls or answer.invalid_tool_calls:
            return Turn(None, answer.text, answer, history)
        answer = message_text(answer, "answer")
    answer = _require_text(answer, "answer")
    if context is not None and not isinstance(context, str):
        raise InputError("context must be a string")
    if len(question) + len(answer) + len(context or "") > MAX_INPUT_CHARS:
        raise InputError(f"input longer than {MAX_INPUT_CHARS} characters")
    pair = QAPair(
        model_safe(question), model_safe(answer), model_safe(context) if context else None
    )
    return Turn(pair, answer, message, history or [HumanMessage(question)])


def parse_input(value: Any) -> Turn:
    """Read one input of :class:`~aligner_chain.AlignerRunnable`."""
    if isinstance(value, dict):
        if "messages" in value and "question" not in value:
            return parse_input(value["messages"])
        question = _require_text(value.get("question"), "question")
        return _turn(question, value.get("answer"), value.get("context"), [])
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return parse_messages(list(value))
    raise InputError(
        "expected {'question': ..., 'answer': ...} or a list of messages, "
        f"got {type(value).__name__}"
    )


def parse_messages(messages: list[Any]) -> Turn:
    """Question = the last human turn before the last AI turn; answer = that AI turn."""
    if not messages:
        raise InputError("the message list is empty")
    if not all(isinstance(m, BaseMessage) for m in messages):
        raise InputError("a message list must hold langchain messages")
    last_ai = next(
        (i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], AIMessage)), None
    )
    if last_ai is None:
        raise InputError("the conversation has no AI answer to judge")
    if last_ai != len(messages) - 1:
        raise InputError(
            f"the conversation ends with a {messages[-1].type} message, not an AI answer"
        )
    history = messages[:last_ai]
    return _turn(question_of(history), messages[last_ai], None, history)


def question_of(history: Sequence[BaseMessage]) -> str:
    """The text of the last human turn: the question an answer after ``history`` answers."""
    human = next((m for m in reversed(history) if isinstance(m, HumanMessage)), None)
    if human is None:
        raise InputError("the conversation has no human turn before the answer")
    return _require_text(message_text(human, "question"), "question")
