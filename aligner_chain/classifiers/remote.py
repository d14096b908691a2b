"""A generative guard model (Llama Guard style) served behind an OpenAI-compatible endpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.classifiers.guard import LLAMA_GUARD_3_CATEGORIES, parse_guard_output
from aligner_chain.errors import ClassifierError
from aligner_chain.openai_http import (
    OpenAICompatibleClient,
    RetrySettings,
    amap_concurrently,
    map_concurrently,
)
from aligner_chain.types import QAPair, Verdict


class OpenAICompatibleGuardClassifier(HarmClassifier):
    """Scores pairs with a guard model through ``/v1/chat/completions``.

    The pair goes as a user and an assistant message, so the server applies the guard's own
    chat template (for Llama Guard 3, its policy prompt). The score is read from the first
    generated token's ``top_logprobs``: P(``unsafe``), renormalised against P(``safe``) unless
    ``normalize=False`` (as :class:`~aligner_chain.classifiers.GuardModelClassifier` does
    locally). Servers that return no logprobs (``transformers serve``) still work: the score is
    then 1.0 or 0.0 from the generated verdict, and ``details["score_source"]`` says ``text``.
    Category codes on the verdict's second line become per-category scores.

    Failures that survive the retries raise :class:`~aligner_chain.errors.ClassifierError`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        categories: Mapping[str, str] | None = None,
        safe_word: str = "safe",
        unsafe_word: str = "unsafe",
        normalize: bool = True,
        top_logprobs: int = 5,
        max_tokens: int = 20,
        api_key_env: str | None = "ALIGNER_GUARD_API_KEY",
        timeout: float | httpx.Timeout = 30.0,
        max_retries: int | None = None,
        retry: RetrySettings | None = None,
        max_concurrency: int = 16,
        extra_body: dict[str, Any] | None = None,
        classifier_id: str | None = None,
    ) -> None:
        self.model = model
        self.categories = dict(categories or {})
        self.safe_word, self.unsafe_word = safe_word.lower(), unsafe_word.lower()
        self.normalize = normalize
        self.top_logprobs = top_logprobs
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency
        self.extra_body = dict(extra_body or {})
        self.classifier_id = classifier_id or model
        retry = retry or RetrySettings()
        if max_retries is not None:
            retry = retry.model_copy(update={"max_retries": max_retries})
        self.client = OpenAICompatibleClient(
            base_url,
            error=ClassifierError,
            api_key_env=api_key_env,
            timeout=timeout,
            retry=retry,
            max_connections=max_concurrency,
            name=self.classifier_id,
        )

    @classmethod
    def llama_guard_3(
        cls, base_url: str, model: str = "meta-llama/Llama-Guard-3-8B", **kwargs: Any
    ) -> OpenAICompatibleGuardClassifier:
        """Llama Guard 3 (1B or 8B) with its S1-S14 category names."""
        kwargs.setdefault("categories", LLAMA_GUARD_3_CATEGORIES)
        return cls(base_url, model, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.client.base_url!r}, model={self.model!r})"

    def _body(self, pair: QAPair) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "user", "content": pair.question},
                {"role": "assistant", "content": pair.answer},
            ],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        if self.top_logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return {**body, **self.extra_body}

    def _first_token_score(self, choice: dict[str, Any]) -> float | None:
        """P(unsafe) from the first token's top logprobs; None when the server sent none."""
        content = (choice.get("logprobs") or {}).get("content") or []
        if not content or not isinstance(content[0], dict):
            return None
        probs = {self.safe_word: 0.0, self.unsafe_word: 0.0}
        for entry in content[0].get("top_logprobs") or []:
            word = str(entry.get("token", "")).strip().lower()
            if word in probs and isinstance(entry.get("logprob"), (int, float)):
                probs[word] += math.exp(entry["logprob"])
        unsafe, safe = probs[self.unsafe_word], probs[self.safe_word]
        if unsafe + safe == 0.0:
            return None
        return unsafe / (unsafe + safe) if self.normalize else unsafe

    def _verdict(self, payload: dict[str, Any]) -> Verdict:
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ClassifierError(f"{self.classifier_id}: the server's answer has no choices")
        choice = choices[0]
        text = str((choice.get("message") or {}).get("content") or "")
        unsafe, names = parse_guard_output(text, self.categories)
        score = self._first_token_score(choice)
        source = "logprobs"
        if score is None:
            if unsafe is None:
                raise ClassifierError(
                    f"{self.classifier_id}: no logprobs and no safe/unsafe verdict in {text!r:.80}"
                )
            score, source = (1.0 if unsafe else 0.0), "text"
        score = min(1.0, max(0.0, score))
        return Verdict(
            score=score,
            categories=dict.fromkeys(names, score),
            classifier_id=self.classifier_id,
            details={"raw": text, "score_source": source},
        )

    def classify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        def one(pair: QAPair) -> Verdict:
            return self._verdict(self.client.post("/v1/chat/completions", self._body(pair)))

        return map_concurrently(one, list(pairs), self.max_concurrency)

    async def aclassify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        async def one(pair: QAPair) -> Verdict:
            return self._verdict(await self.client.apost("/v1/chat/completions", self._body(pair)))

        return await amap_concurrently(one, list(pairs), self.max_concurrency)
