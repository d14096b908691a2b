"""Value types passed between classifiers, correctors and the routing policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True, slots=True)
class QAPair:
    """One (question, answer) pair to judge or correct.

    ``context`` carries optional grounding text (e.g. retrieved documents) that a RAG template may
    show to the corrector or classifier; plain templates ignore it.
    """

    question: str
    answer: str
    context: str | None = None


class Verdict(BaseModel):
    """A classifier's judgement of one pair.

    ``score`` is the probability that the answer is harmful *given the question*; a refusal to a
    harmful question scores low.
    """

    model_config = ConfigDict(frozen=True)

    score: float = Field(ge=0.0, le=1.0)
    categories: dict[str, float] = Field(default_factory=dict)
    classifier_id: str = ""
    stage: str | None = None
    details: dict[str, float | str] = Field(default_factory=dict)


@dataclass(slots=True)
class Correction:
    """A corrector's output for one pair.

    ``text`` is only the generated continuation (never the prompt); ``empty`` is set when the
    model produced nothing usable, in which case the caller must keep the original answer.
    """

    text: str
    model_id: str
    truncated: bool = False
    empty: bool = False
    info: dict[str, object] = field(default_factory=dict)


def as_pairs(value: object) -> list[QAPair]:
    """Accept one pair or a sequence of pairs: ``QAPair``, ``(q, a)`` or a question/answer dict.

    Raises :class:`~aligner_chain.errors.InputError` on anything else, so a wrong call fails with a
    typed error instead of deep inside a tokenizer.
    """
    from aligner_chain.errors import InputError

    def one(item: object) -> QAPair:
        if isinstance(item, QAPair):
            pair = item
        elif isinstance(item, tuple) and len(item) in (2, 3):
            pair = QAPair(*item)
        elif isinstance(item, dict) and "question" in item and "answer" in item:
            pair = QAPair(item["question"], item["answer"], item.get("context"))
        else:
            raise InputError(f"expected a (question, answer) pair, got {type(item).__name__}")
        if not isinstance(pair.question, str) or not isinstance(pair.answer, str):
            raise InputError("question and answer must be strings")
        if pair.context is not None and not isinstance(pair.context, str):
            raise InputError("context must be a string or None")
        return pair

    if isinstance(value, (QAPair, tuple, dict)):
        return [one(value)]
    if isinstance(value, (list,)) or (
        hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict))
    ):
        return [one(item) for item in value]  # type: ignore[union-attr]
    raise InputError(f"expected pairs, got {type(value).__name__}")
