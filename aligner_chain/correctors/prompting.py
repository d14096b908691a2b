"""Aligner prompt preparation shared by the local and the remote correctors.

Both must build the same prompt and truncate the same way, so that moving the Aligner from a
local model to a server does not change its corrections.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aligner_chain.errors import InputError
from aligner_chain.types import QAPair

if TYPE_CHECKING:
    from aligner_chain.correctors.transformers import GenerationSettings
    from aligner_chain.templates import PromptTemplate

logger = logging.getLogger(__name__)


class TokenizerHolder(Protocol):
    """What prompt preparation needs: a tokenizer and the lock that serialises its use."""

    tokenizer: Any
    lock: threading.Lock


@dataclass
class PreparedPrompt:
    """The prompt, its token ids (encoded once, reused as the model's input) and its budget."""

    prompt: str
    ids: list[int]
    max_new_tokens: int
    truncated: bool


class PromptPreparation:
    """Mixin: builds the Aligner prompt for a pair, truncating it to fit the context.

    Expects ``loaded`` (a :class:`TokenizerHolder`), ``template``, ``generation``, ``context``
    and ``_overhead`` (tokens of the empty template) on the instance.
    """

    loaded: TokenizerHolder
    template: PromptTemplate
    generation: GenerationSettings
    context: int
    model_id: str
    _overhead: int

    @property
    def cache_identity(self) -> dict[str, Any]:
        """The model, the prompt and the decoding settings (the draft memory changes only the
        speed, so it is left out)."""
        return {
            "model_id": self.model_id,
            "template": self.template.text,
            "generation": self.generation.model_dump(mode="json", exclude={"draft_memory"}),
        }

    # -- prompt building ---------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        with self.loaded.lock:
            return self.loaded.tokenizer(text, split_special_tokens=True)["input_ids"]

    def _encode_all(self, *texts: str) -> list[list[int]]:
        """``self._encode`` of each text, one by one on the calling thread: a list call hands the
        texts to the tokenizer's thread pool, whose wake-up cost a kept mini-Aligner call 1.6 ms
        of its 6 when another process kept the second core busy (0.03 ms when idle)."""
        with self.loaded.lock:
            tokenizer = self.loaded.tokenizer
            return [tokenizer(text, split_special_tokens=True)["input_ids"] for text in texts]

    def _keep_end(self, text: str, keep: int) -> str:
        """The suffix of ``text`` made of its last ``keep`` tokens."""
        if keep <= 0:
            return ""
        with self.loaded.lock:
            enc = self.loaded.tokenizer(
                text,
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=True,
            )
        offsets = enc["offset_mapping"]
        if keep >= len(offsets):
            return text
        return text[offsets[len(offsets) - keep][0] :]

    def _prepare(self, pair: QAPair) -> PreparedPrompt:
        if not isinstance(pair.question, str) or not isinstance(pair.answer, str):
            raise InputError("question and answer must be strings")
        question, answer = pair.question, pair.answer
        # The parts' lengths decide truncation, and the prompt's ids are the model's input
        # unless truncation rebuilds it.
        prompt = self.template.format(question, answer, pair.context)
        q_ids, a_ids, ids = self._encode_all(question, answer, prompt)
        n_q, n_a = len(q_ids) if question else 0, len(a_ids) if answer else 0
        gen = self.generation

        def total(q: int, a: int) -> int:
            return self._overhead + q + a + gen.budget(a)

        truncated = False
        if total(n_q, n_a) > self.context:
            truncated = True
            q_keep = max(min(n_q, 32), n_q - (total(n_q, n_a) - self.context))
            a_keep = n_a
            if total(q_keep, a_keep) > self.context:
                lo, hi = 0, n_a  # largest a_keep that fits
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if total(q_keep, mid) <= self.context else (lo, mid - 1)
                a_keep = lo
            if a_keep < 1:
                raise InputError(
                    f"the model's context ({self.context} tokens) cannot hold this input"
                )
            question, answer = self._keep_end(question, q_keep), self._keep_end(answer, a_keep)
            n_a = a_keep
            logger.warning(
                "input truncated to fit %d tokens: question %d->%d, answer kept its last %d",
                self.context,
                n_q,
                q_keep,
                a_keep,
            )
            prompt = self.template.format(question, answer, pair.context)
            ids = self._encode(prompt)
        # Joint tokenization can differ from the parts by a few tokens: never exceed the context.
        budget = max(1, min(gen.budget(n_a), self.context - len(ids)))
        return PreparedPrompt(prompt, ids, budget, truncated)


class StreamTrimmer:
    """Removes leading and trailing whitespace from a text that arrives in deltas, so the
    concatenation of what :meth:`feed` returns equals the stripped whole text."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def feed(self, delta: str) -> str:
        """The part of the text that can be emitted after ``delta`` arrived (maybe empty)."""
        if not self.started:
            delta = delta.lstrip()
            if not delta:
                return ""
            self.started = True
        text = self.pending + delta
        body = text.rstrip()
        self.pending = text[len(body) :]
        return body


def trim_stream(deltas: Iterator[str]) -> Iterator[str]:
    """Yield deltas with leading and trailing whitespace removed from the whole text, so the
    concatenation equals the stripped text that :meth:`TransformersCorrector.correct` returns."""
    trimmer = StreamTrimmer()
    for delta in deltas:
        if body := trimmer.feed(delta):
            yield body
