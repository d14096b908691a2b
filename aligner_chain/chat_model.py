"""``AlignedChatModel``: any chat model with the Aligner step inside its own run.

The inner model's answer is judged, and corrected, re-asked or refused, before the wrapper
returns or streams anything. The inner call and the Aligner's stages run as child runs tagged
``nostream`` and detached from streaming callback handlers, so LangGraph's
``stream_mode="messages"`` and ``astream_events`` carry only the final answer. This is the
no-leak surface in every streaming mode: the LangGraph node streams the raw tokens first, and
so does ``AlignerMiddleware`` except in sentence mode under the v3 event protocol.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import Context, copy_context
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.runnables.utils import coro_with_context
from langchain_core.tools import BaseTool

# Marker types of the handlers behind astream_events, stream_events(v3) and LangGraph's
# messages/tools streams; langchain-core keeps them stable for LangGraph's use.
from langchain_core.tracers._streaming import (
    _StreamingCallbackHandler,
    _V2StreamingCallbackHandler,
)
from langchain_core.utils.utils import LC_ID_PREFIX
from langgraph.constants import TAG_NOSTREAM
from pydantic import ConfigDict, Field

from aligner_chain.errors import ConfigurationError, InputError
from aligner_chain.inputs import question_of
from aligner_chain.runnable import AlignerRunnable, tool_call_chunks
from aligner_chain.streaming import aannounce, announce, chunk_events

_PARTS = ("classifier", "corrector", "policy", "rule", "recorder")


class AlignedChatModel(BaseChatModel):
    """A chat model whose answers pass through the Aligner step before anyone sees them.

    Build it with ``AlignedChatModel(llm=chat_model, aligner=AlignerRunnable(...))`` or with the
    aligner's parts (``classifier=``, ``corrector=``, ``policy=``, ``rule=``, ``recorder=``),
    or with :func:`with_aligner`.

    - Every answer without tool calls carries its decision record in
      ``response_metadata["aligner"]``, with the inner model's original answer in it.
      Tool-call turns are returned untouched: they are steps, not answers.
    - A re-ask calls the inner model again (with its bound tools and call options) on the
      conversation plus the policy's feedback; the aligner's own ``upstream`` is replaced by it.
      A re-asked answer that calls a tool is returned as that tool-call turn.
    - The record holds the original answer: drop ``response_metadata["aligner"]`` before
      forwarding messages to a client that must not see it.
    - ``bind_tools`` binds the tools to the inner model; ``with_structured_output`` is the inner
      model's own and is not corrected (rewriting a schema-bound answer would break it).
    - Streaming releases nothing before the verdict; a correction streams token by token when
      the policy does not verify it, otherwise it arrives in one piece.
    - Bad input: an empty message list raises :class:`InputError` before the inner call. An
      answer the aligner cannot judge (no human turn before it, no text in the question or
      the answer) follows ``policy.on_error``: ``fail_open`` returns it unchanged,
      ``fail_closed`` refuses; its record (route ``passthrough``/``refuse``) holds the original
      and the reason. Errors raised by the inner model propagate unchanged.

    Token usage is reported by the inner model's runs (callbacks, LangSmith), once per call
    re-asks included; the final message carries no ``usage_metadata`` of its own, which would
    count the same tokens twice.

    Tracing: under ``invoke``/``ainvoke`` and ``stream``/``astream`` the inner run nests under
    this model's run. When ``invoke`` streams implicitly (a streaming handler is attached, as in
    LangGraph's messages mode) langchain-core gives ``_stream`` no run manager, so the inner run
    nests under the caller's run (the LangGraph node) instead; sentence-streaming events then
    reach ``astream_events`` under that run.
    """

    llm: BaseChatModel
    """The model that writes the answers."""
    aligner: AlignerRunnable
    """The Aligner step that judges them."""
    bound_llm: Runnable | None = Field(default=None, exclude=True)
    """``llm`` with tools bound, set by :meth:`bind_tools`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def __init__(self, **kwargs: Any) -> None:
        # Parts are accepted for convenience; mixing them with a built aligner is ambiguous.
        parts = {k: kwargs.pop(k) for k in _PARTS if k in kwargs}
        if kwargs.get("aligner") is None:
            kwargs["aligner"] = AlignerRunnable(**{k: v for k, v in parts.items() if v is not None})
        elif parts:
            raise ConfigurationError(
                f"pass an AlignerRunnable or its parts, not both: {sorted(parts)}"
            )
        super().__init__(**kwargs)

    @property
    def _llm_type(self) -> str:
        return "aligned-chat-model"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        # Part of langchain's cache key: answers aligned under another policy or by other
        # models must not be served from the cache.
        aligner = self.aligner
        return {
            "llm_type": self.llm._llm_type,
            "llm": dict(self.llm._identifying_params),
            "aligner": {
                "classifier": getattr(aligner.classifier, "classifier_id", None),
                "corrector": getattr(aligner.corrector, "cache_identity", None),
                "policy": aligner.policy.model_dump(mode="json"),
            },
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        # The inner run reports the real provider; a different provider here keeps tracing
        # tools from pricing the same tokens twice.
        params = self.llm._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "aligner"
        model = kwargs.get("model")
        if isinstance(model, str):
            params["ls_model_name"] = model
        params.setdefault("ls_model_name", self.llm.get_name())
        return params

    # -- tools and structured output ---------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools to the inner model, in its own provider format; the wrapper stays outside
        so tool-call turns pass through and final answers are still aligned."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        bound = self.llm.bind_tools(tools, **kwargs)
        return self.model_copy(update={"bound_llm": bound}).bind()

    def with_structured_output(
        self, schema: dict[str, Any] | type, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[LanguageModelInput, Any]:
        """The inner model's structured output, uncorrected: the Aligner rewrites prose."""
        return self.llm.with_structured_output(schema, include_raw=include_raw, **kwargs)

    # -- streaming entry points --------------------------------------------------------------

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        """Stream as any chat model does, inside a context that names this model's run as the
        parent: langchain-core gives ``_stream`` no run manager, and without it the inner run
        would not nest under this one nor sentence events reach its ``astream_events``."""
        config, context = _run_context(config)
        chunks = context.run(super().stream, input, config, stop=stop, **kwargs)
        try:
            while True:
                try:
                    chunk = context.run(next, chunks)
                except StopIteration:
                    return
                yield chunk
        finally:
            context.run(chunks.close)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        config, context = _run_context(config)
        chunks = super().astream(input, config, stop=stop, **kwargs)
        try:
            while True:
                try:
                    chunk = await coro_with_context(chunks.__anext__(), context)
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            await coro_with_context(chunks.aclose(), context)

    # -- generation --------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        upstream, config = self._start(messages, stop, kwargs, run_manager)
        answer = upstream.invoke(messages, config)
        try:
            final = self._aligner(upstream).invoke([*messages, answer], config)
        except InputError as exc:
            final = self._unjudged(messages, answer, exc)
        return _result(final, answer)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        upstream, config = self._start(messages, stop, kwargs, run_manager)
        answer = await upstream.ainvoke(messages, config)
        try:
            final = await self._aligner(upstream).ainvoke([*messages, answer], config)
        except InputError as exc:
            final = self._unjudged(messages, answer, exc)
        return _result(final, answer)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # No callbacks fired here: BaseChatModel reports every yielded chunk itself.
        outer = ensure_config()
        upstream, config = self._start(messages, stop, kwargs, run_manager)
        aligner = self._aligner(upstream)
        if aligner.policy.stream == "sentence":
            # The inner model streams into the step, which releases judged sentences. The
            # step's own runs are hidden from streaming handlers, so its events are told to
            # astream_events here, under this model's run (or the caller's).
            question = {"question": question_of(messages)}
            answer = ({"answer": c} for c in upstream.stream(messages, config))
            for chunk in aligner.transform(itertools.chain([question], answer), config):
                for event in chunk_events(chunk):
                    announce(event, outer, graph=False)
                yield ChatGenerationChunk(message=chunk)
            return
        answer = upstream.invoke(messages, config)
        streamed = False
        try:
            for chunk in aligner.stream([*messages, answer], config):
                yield ChatGenerationChunk(message=_chunk(chunk, answer, streamed))
                streamed = True
        except InputError as exc:
            if streamed:
                raise
            unjudged = _own(self._unjudged(messages, answer, exc), answer)
            yield ChatGenerationChunk(message=_as_chunk(unjudged))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        outer = ensure_config()
        upstream, config = self._start(messages, stop, kwargs, run_manager)
        aligner = self._aligner(upstream)
        if aligner.policy.stream == "sentence":
            question = question_of(messages)

            async def feed() -> AsyncIterator[dict[str, Any]]:
                yield {"question": question}
                async for c in upstream.astream(messages, config):
                    yield {"answer": c}

            async for chunk in aligner.atransform(feed(), config):
                for event in chunk_events(chunk):
                    await aannounce(event, outer, graph=False)
                yield ChatGenerationChunk(message=chunk)
            return
        answer = await upstream.ainvoke(messages, config)
        streamed = False
        try:
            async for chunk in aligner.astream([*messages, answer], config):
                yield ChatGenerationChunk(message=_chunk(chunk, answer, streamed))
                streamed = True
        except InputError as exc:
            if streamed:
                raise
            unjudged = _own(self._unjudged(messages, answer, exc), answer)
            yield ChatGenerationChunk(message=_as_chunk(unjudged))

    # -- steps -------------------------------------------------------------------------------

    def _start(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
    ) -> tuple[Runnable, RunnableConfig]:
        """The inner model with this call's options bound (a re-ask reuses them), and the
        config that hides its run from streams."""
        if not messages:
            raise InputError("the message list is empty")
        inner = self.bound_llm if self.bound_llm is not None else self.llm
        upstream = inner.bind(stop=stop, **kwargs) if stop or kwargs else inner
        return upstream, _hidden_config(run_manager)

    def _aligner(self, upstream: Runnable) -> AlignerRunnable:
        return self.aligner.model_copy(update={"upstream": upstream})

    def _unjudged(
        self, messages: list[BaseMessage], answer: AIMessage, exc: InputError
    ) -> AIMessage:
        """Apply ``policy.on_error`` to an answer the step cannot judge (no question or answer
        text, a re-asked answer without text), keeping it recorded; the result is final."""
        human = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)
        return self.aligner.unjudged(human.text if human is not None else "", answer, exc)


def with_aligner(llm: BaseChatModel, **options: Any) -> AlignedChatModel:
    """``llm`` wrapped with the Aligner step; ``options`` are :class:`AlignedChatModel`'s
    (``aligner=`` or its parts, plus any chat model field such as ``tags``)."""
    return AlignedChatModel(llm=llm, **options)


# -- helpers ---------------------------------------------------------------------------------


def _hidden_config(
    run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
) -> RunnableConfig:
    """A child config whose runs no client stream sees: tagged ``nostream`` (LangGraph's
    messages stream skips such model runs) and without streaming handlers (``astream_events``
    does not filter tags, and a raw answer also shows in chain inputs). Tracers are kept."""
    if run_manager is None:
        manager = CallbackManager.configure(ensure_config().get("callbacks"))
    else:
        # An LLM run manager has no get_child(); this is what get_child() builds.
        manager = CallbackManager(handlers=[], parent_run_id=run_manager.run_id)
        manager.set_handlers(run_manager.inheritable_handlers)
        manager.add_tags(run_manager.inheritable_tags)
        manager.add_metadata(run_manager.inheritable_metadata)
    for handler in [*manager.handlers, *manager.inheritable_handlers]:
        if isinstance(handler, (_StreamingCallbackHandler, _V2StreamingCallbackHandler)):
            manager.remove_handler(handler)
    return {"callbacks": manager, "tags": [TAG_NOSTREAM]}


def _run_context(config: RunnableConfig | None) -> tuple[RunnableConfig, Context]:
    """The config of a streamed call with its run id fixed in advance, and a context whose
    current config has callbacks parented to that run (``_stream`` reads it)."""
    config = ensure_config(config)
    run_id = config.get("run_id") or uuid.uuid4()
    manager = CallbackManager.configure(
        config.get("callbacks"),
        inheritable_tags=config.get("tags"),
        inheritable_metadata=config.get("metadata"),
    )
    manager.parent_run_id = run_id
    context = copy_context()
    current = var_child_runnable_config.get() or {}
    context.run(var_child_runnable_config.set, {**current, "callbacks": manager})
    return {**config, "run_id": run_id}, context


def _own(message: AIMessage, answer: AIMessage, *, restore: bool = True) -> AIMessage:
    """``message`` as this model's: without the inner run's id (the wrapper run assigns its
    own; provider ids are kept), without token usage (the inner runs report it, so repeating
    it here would count the tokens twice), and with ``restore`` the original content blocks of
    an answer that was not changed."""
    update: dict[str, Any] = {"usage_metadata": None}
    if message.id and message.id.startswith(LC_ID_PREFIX):
        update["id"] = None
    record = message.response_metadata.get("aligner")
    if restore and record is not None and not record["changed"]:
        update["content"] = answer.content
    return message.model_copy(update=update)


def _result(final: AIMessage, answer: AIMessage) -> ChatResult:
    return ChatResult(generations=[ChatGeneration(message=_own(final, answer))])


def _chunk(chunk: AIMessageChunk, answer: AIMessage, streamed: bool) -> AIMessageChunk:
    """A chunk of the aligner's stream, as this model's (the last one restores the original
    content when nothing was streamed before it)."""
    if chunk.chunk_position != "last":
        return chunk
    return _own(chunk, answer, restore=not streamed)


def _as_chunk(message: AIMessage) -> AIMessageChunk:
    """A whole message as one final chunk, tool calls included."""
    return AIMessageChunk(
        content=message.content,
        id=message.id,
        additional_kwargs=message.additional_kwargs,
        response_metadata=message.response_metadata,
        tool_call_chunks=tool_call_chunks(message),
        chunk_position="last",
    )
