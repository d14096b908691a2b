"""A corrector that sends the Aligner prompt to an OpenAI-compatible server.

For production the Aligner runs on a GPU server shared by many app processes (vLLM, SGLang,
TGI or ``transformers serve``); this client builds exactly the prompt and token budget that
:class:`~aligner_chain.correctors.transformers.TransformersCorrector` would, so moving the model
to a server changes where it runs, not what it sees. Only the tokenizer is loaded locally.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from transformers import AutoTokenizer

from aligner_chain.correctors.base import Corrector
from aligner_chain.correctors.prompting import PreparedPrompt, PromptPreparation, StreamTrimmer
from aligner_chain.correctors.transformers import GenerationSettings
from aligner_chain.errors import ConfigurationError, CorrectorError, ModelLoadError
from aligner_chain.loading import LoadKey, check_model_source, load_once
from aligner_chain.openai_http import (
    OpenAICompatibleClient,
    RetrySettings,
    amap_concurrently,
    map_concurrently,
)
from aligner_chain.templates import PromptTemplate
from aligner_chain.types import Correction, QAPair

_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class _Tokenizer:
    tokenizer: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


def _load_tokenizer(source: str, trust_remote_code: bool) -> _Tokenizer:
    source = check_model_source(source)
    key = LoadKey("tokenizer", source, "", "", (("trust_remote_code", str(trust_remote_code)),))
    try:
        return load_once(
            key,
            lambda: _Tokenizer(
                AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            ),
        )
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"{exc} (the corrector counts tokens locally: pass tokenizer= with a local folder "
            "or hub id of the served model's tokenizer)"
        ) from exc


@dataclass
class _Stream:
    """What a streamed correction accumulated so far."""

    text: str = ""
    finish: str | None = None
    usage: Any = None
    trimmer: StreamTrimmer = field(default_factory=StreamTrimmer)


class OpenAICompatibleCorrector(PromptPreparation, Corrector):
    """Corrects answers through ``/v1/completions`` of an OpenAI-compatible server.

    Args:
        base_url: the server root, e.g. ``http://gpu-host:8000`` (without ``/v1``).
        model: the served model name (vLLM's ``--served-model-name`` or its path).
        template: as for :class:`TransformersCorrector`.
        generation: as for :class:`TransformersCorrector`. Greedy is sent as ``temperature=0``;
            ``top_k`` and ``repetition_penalty`` are sent only when set (vLLM and SGLang
            accept them, ``transformers serve`` rejects unknown fields with 422). ``extra``
            holds ``generate`` kwargs of a local model and is not sent: use ``extra_body``.
        tokenizer: local folder or hub id of the model's tokenizer, used to count tokens for
            truncation and the ``max_tokens`` budget; defaults to ``model``.
        max_context_tokens: the served context length (``--max-model-len``); defaults to the
            tokenizer's ``model_max_length`` when it is a real limit, else 2048 (the Aligner's
            training length).
        mode: ``completions`` (default) sends the prompt as is. ``chat`` is for servers without
            ``/v1/completions``: the prompt goes as one user message, so the server's chat
            template must pass it through unchanged (``integrations/vllm/passthrough.jinja``).
        prompt_token_ids: send the prompt as the token ids computed here (vLLM, SGLang) rather
            than as text, so special-token text inside an answer (``</s>``) is not parsed as a
            special token by the server; ``completions`` mode only.
        api_key_env: environment variable holding the bearer token (unset: no auth header).
        timeout: seconds (or an ``httpx.Timeout``) for each HTTP request.
        retry: retry settings; ``max_retries`` is a shortcut for the most common one.
        max_concurrency: requests in flight for one batch (one request per pair).
        extra_body: fields merged into every request body (server-specific options).

    Truncation and empty output behave as in :class:`TransformersCorrector`: an input too long
    for the context keeps the end of the answer (``truncated=True``), and an empty correction
    comes back as ``Correction(empty=True)`` so the caller keeps the original answer. Failures
    that survive the retries raise :class:`~aligner_chain.errors.CorrectorError`, which the
    routing policy's ``on_error`` turns into a fallback.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        template: str | PromptTemplate | None = None,
        generation: Literal["greedy", "paper"] | GenerationSettings = "greedy",
        tokenizer: str | None = None,
        max_context_tokens: int | None = None,
        mode: Literal["completions", "chat"] = "completions",
        prompt_token_ids: bool = False,
        api_key_env: str | None = "ALIGNER_API_KEY",
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int | None = None,
        retry: RetrySettings | None = None,
        max_concurrency: int = 16,
        extra_body: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        model_id: str | None = None,
    ) -> None:
        self.template = PromptTemplate.resolve(template)
        self.generation = GenerationSettings.resolve(generation)
        self.model = model
        if prompt_token_ids and mode != "completions":
            raise ConfigurationError("prompt_token_ids needs mode='completions'")
        self.mode = mode
        self.prompt_token_ids = prompt_token_ids
        self.path = _PATHS[mode]
        self.model_id = model_id or model
        self.max_concurrency = max_concurrency
        self.extra_body = dict(extra_body or {})
        self.loaded = _load_tokenizer(tokenizer or model, trust_remote_code)
        limit = getattr(self.loaded.tokenizer, "model_max_length", 0) or 0
        self.context = max_context_tokens or (limit if 0 < limit < 1_000_000 else 2048)
        self._overhead = len(self._encode(self.template.format("", "")))
        retry = retry or RetrySettings()
        if max_retries is not None:
            retry = retry.model_copy(update={"max_retries": max_retries})
        self.client = OpenAICompatibleClient(
            base_url,
            error=CorrectorError,
            api_key_env=api_key_env,
            timeout=timeout,
            retry=retry,
            max_connections=max_concurrency,
            name=self.model_id,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.client.base_url!r}, model={self.model!r}, "
            f"mode={self.mode!r})"
        )

    # -- requests ----------------------------------------------------------------------------

    def _body(self, prepared: PreparedPrompt, stream: bool) -> dict[str, Any]:
        gen = self.generation
        body: dict[str, Any] = {"model": self.model, "max_tokens": prepared.max_new_tokens}
        if self.mode == "chat":
            body["messages"] = [{"role": "user", "content": prepared.prompt}]
        elif self.prompt_token_ids:
            body["prompt"] = prepared.ids
        else:
            body["prompt"] = prepared.prompt
        if gen.do_sample:
            for name in ("temperature", "top_p", "top_k"):
                if getattr(gen, name) is not None:
                    body[name] = getattr(gen, name)
        else:
            body["temperature"] = 0.0
        if gen.repetition_penalty is not None:
            body["repetition_penalty"] = gen.repetition_penalty
        if stream:
            body["stream"] = True
        return {**body, **self.extra_body}

    def _text(self, choice: dict[str, Any], stream: bool) -> str:
        if self.mode == "completions":
            return choice.get("text") or ""
        message = choice.get("delta" if stream else "message") or {}
        return message.get("content") or ""

    def _choice(self, payload: dict[str, Any]) -> dict[str, Any]:
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise CorrectorError(f"{self.model_id}: the server's answer has no choices")
        return choices[0]

    def _correction(
        self, text: str, prepared: PreparedPrompt, finish: str | None, usage: Any
    ) -> Correction:
        text = text.strip()
        info: dict[str, object] = {"finish_reason": finish}
        if isinstance(usage, dict) and "completion_tokens" in usage:
            info["new_tokens"] = usage["completion_tokens"]
        return Correction(
            text=text,
            model_id=self.model_id,
            truncated=prepared.truncated,
            empty=not text,
            info=info,
        )

    def _from_payload(self, payload: dict[str, Any], prepared: PreparedPrompt) -> Correction:
        choice = self._choice(payload)
        return self._correction(
            self._text(choice, False), prepared, choice.get("finish_reason"), payload.get("usage")
        )

    # -- Corrector API -----------------------------------------------------------------------

    def correct(self, pairs: Sequence[QAPair]) -> list[Correction]:
        def one(p: PreparedPrompt) -> Correction:
            return self._from_payload(self.client.post(self.path, self._body(p, False)), p)

        return map_concurrently(one, [self._prepare(p) for p in pairs], self.max_concurrency)

    async def acorrect(self, pairs: Sequence[QAPair]) -> list[Correction]:
        async def one(p: PreparedPrompt) -> Correction:
            return self._from_payload(await self.client.apost(self.path, self._body(p, False)), p)

        prepared = [self._prepare(p) for p in pairs]
        return await amap_concurrently(one, prepared, self.max_concurrency)

    def _feed(self, stream: _Stream, event: dict[str, Any]) -> str:
        """Fold one stream event into ``stream``; returns the trimmed text to emit."""
        choices = event.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        delta = self._text(choice, True)
        stream.text += delta
        stream.finish = choice.get("finish_reason") or stream.finish
        stream.usage = event.get("usage") or stream.usage
        return stream.trimmer.feed(delta)

    def stream_correction(self, pair: QAPair) -> Iterator[str | Correction]:
        prepared = self._prepare(pair)
        stream = _Stream()
        for event in self.client.stream(self.path, self._body(prepared, True)):
            if text := self._feed(stream, event):
                yield text
        yield self._correction(stream.text, prepared, stream.finish, stream.usage)

    async def astream_correction(self, pair: QAPair) -> AsyncIterator[str | Correction]:
        prepared = self._prepare(pair)
        stream = _Stream()
        async for event in self.client.astream(self.path, self._body(prepared, True)):
            if text := self._feed(stream, event):
                yield text
        yield self._correction(stream.text, prepared, stream.finish, stream.usage)
