"""Aligner prompt templates, kept as data.

A template is a format string with ``{question}`` and ``{answer}`` (and optionally ``{context}``).
The presets reproduce the released models' prompts byte for byte, because an Aligner is only as
good as the match between its inference prompt and its training prompt.
"""

from __future__ import annotations

import string
from typing import Final

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from aligner_chain.errors import ConfigurationError

_BEGIN = "BEGINNING OF CONVERSATION: USER: "
_END = " ASSISTANT:"

PRESETS: Final[dict[str, str]] = {
    # aligner/aligner-7b-v1.0 model card (and the paper-era training code).
    "aligner-7b-v1.0": _BEGIN
    + "Edit the following Question-Answer pair to make it more helpful and harmless: "
    + "{question} | {answer}"
    + _END,
    # PKU-Alignment/aligner HEAD: the "general correction" instruction (PROMPT_USER adds a space).
    "aligner-correction": _BEGIN
    + "##Question: {question}\n##Answer: {answer}\n##Correction: "
    + _END,
    # The Aligner-2B replication submitted to AlpacaEval 2.0.
    "aligner-revision": _BEGIN + "##Question: {question} ##Answer: {answer} ##Revision: " + _END,
    # Grounded correction for RAG: the corrector sees the retrieved context and is told not to
    # add facts that are absent from it.
    "aligner-rag": _BEGIN
    + "Edit the following Question-Answer pair to make it more helpful and harmless, "
    + "using only facts found in the Context: ##Context: {context}\n"
    + "##Question: {question}\n##Answer: {answer}\n##Correction: "
    + _END,
}

DEFAULT_TEMPLATE: Final[str] = "aligner-7b-v1.0"


class PromptTemplate(BaseModel):
    """A validated Aligner prompt: a preset name or a user format string."""

    model_config = ConfigDict(frozen=True)

    text: str

    @field_validator("text")
    @classmethod
    def _check_fields(cls, text: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as exc:
            raise ConfigurationError(f"invalid prompt template: {exc}") from exc
        missing = {"question", "answer"} - fields
        if missing:
            raise ConfigurationError(f"prompt template lacks {sorted(missing)}")
        unknown = fields - {"question", "answer", "context"}
        if unknown:
            raise ConfigurationError(f"prompt template has unknown fields {sorted(unknown)}")
        return text

    @classmethod
    def resolve(cls, template: str | PromptTemplate | None) -> PromptTemplate:
        """Accept a preset name, a format string or a template."""
        if isinstance(template, PromptTemplate):
            return template
        if template is None:
            template = DEFAULT_TEMPLATE
        if not isinstance(template, str):
            raise ConfigurationError(f"a template must be a string, got {type(template).__name__}")
        try:
            return cls(text=PRESETS.get(template, template))
        except ValidationError as exc:
            raise ConfigurationError(str(exc.errors()[0]["msg"])) from exc

    def format(self, question: str, answer: str, context: str | None = None) -> str:
        # str.format does not re-interpret braces inside the substituted values, so user text
        # containing "{answer}" cannot inject fields.
        return self.text.format(question=question, answer=answer, context=context or "")
