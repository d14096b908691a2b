"""A small client for OpenAI-compatible servers (vLLM, SGLang, TGI, ``transformers serve``).

Shared by the remote corrector and the remote guard classifier: pooled httpx clients (one sync
client, one async client per event loop), per-request timeouts, server-sent events, and
tenacity retries with exponential backoff and jitter on connection errors, timeouts, 5xx and
429 (waiting at least ``Retry-After``), never on other 4xx, whose cause a retry cannot fix.

The API key is read from an environment variable, sent only as a bearer header, redacted from
error messages, and never logged or shown in ``repr``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
)

from aligner_chain.errors import AlignerError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class RetrySettings(BaseModel):
    """When and how long to retry a failed request.

    ``max_retries`` counts retries after the first attempt. The wait before retry *n* is
    ``initial_backoff_s * 2**(n-1)`` plus up to ``jitter_s`` of random jitter, capped at
    ``max_backoff_s``; a ``Retry-After`` header replaces it (capped at ``max_retry_after_s``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retries: int = Field(default=4, ge=0)
    initial_backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=20.0, ge=0)
    jitter_s: float = Field(default=0.5, ge=0)
    max_retry_after_s: float = Field(default=60.0, ge=0)


class _Retryable(Exception):
    """A failure a later attempt may not repeat (connection, timeout, 5xx, 429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _event(line: str) -> dict[str, Any] | None:
    """The JSON payload of one SSE ``data:`` line; None for other lines and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise _Retryable("the stream sent an event that is not JSON") from exc
    if not isinstance(event, dict):
        raise _Retryable("the stream sent an event that is not an object")
    if "error" in event:  # vLLM and transformers serve report failures in-band
        raise _Retryable(f"the server reported an error in the stream: {event['error']}")
    return event


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of ``data:`` lines, up to ``data: [DONE]`` if the server sends one."""
    for line in lines:
        if line.strip() == "data: [DONE]":
            return
        event = _event(line)
        if event is not None:
            yield event


async def asse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """Async variant of :func:`sse_events`."""
    async for line in lines:
        if line.strip() == "data: [DONE]":
            return
        event = _event(line)
        if event is not None:
            yield event


def map_concurrently(fn: Callable[[T], R], items: Sequence[T], limit: int) -> list[R]:
    """``[fn(x) for x in items]`` with up to ``limit`` requests in flight (one per item)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(len(items), limit)) as pool:
        return list(pool.map(fn, items))


async def amap_concurrently(
    fn: Callable[[T], Awaitable[R]], items: Sequence[T], limit: int
) -> list[R]:
    """Async variant of :func:`map_concurrently`."""
    gate = asyncio.Semaphore(limit)

    async def one(item: T) -> R:
        async with gate:
            return await fn(item)

    return list(await asyncio.gather(*(one(x) for x in items)))


class OpenAICompatibleClient:
    """POST JSON (or read an SSE stream) with pooling, timeouts and retries.

    Failures that survive the retries, and every non-retryable one, raise ``error`` (the
    caller's typed error, e.g. :class:`~aligner_chain.errors.CorrectorError`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        error: type[AlignerError],
        api_key_env: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        retry: RetrySettings | None = None,
        max_connections: int = 32,
        name: str = "remote",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.error = error
        self.retry = retry or RetrySettings()
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env, "").strip() if api_key_env else ""
        self._secret = key
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = httpx.Client(**self._client_kwargs())
        # An httpx.AsyncClient belongs to the event loop it first ran on: one per loop.
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._aclients = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        auth = f"key from ${self.api_key_env}" if self._secret else "no key"
        return f"{type(self).__name__}({self.base_url!r}, {auth})"

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "headers": self._headers,
            "timeout": self._timeout,
            "limits": self._limits,
        }

    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            client = self._aclients[loop] = httpx.AsyncClient(**self._client_kwargs())
        return client

    def close(self) -> None:
        """Close the pooled sync connections (async pools close with their event loop)."""
        self._client.close()

    # -- retries -----------------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry.max_retry_after_s)
        r = self.retry
        backoff = r.initial_backoff_s * 2 ** (state.attempt_number - 1)
        return min(r.max_backoff_s, backoff + random.uniform(0, r.jitter_s))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "%s: %s; retry %d/%d in %.2fs",
            self.name,
            exc,
            state.attempt_number,
            self.retry.max_retries,
            wait,
        )

    def _retry_kwargs(self) -> dict[str, Any]:
        return {
            "retry": retry_if_exception_type(_Retryable),
            "stop": stop_after_attempt(self.retry.max_retries + 1),
            "wait": self._wait,
            "before_sleep": self._log_retry,
            "reraise": True,
        }

    def _give_up(self, path: str, exc: _Retryable) -> AlignerError:
        attempts = self.retry.max_retries + 1
        return self.error(f"{self.name}: POST {path} failed after {attempts} attempts: {exc}")

    def _with_retries(self, path: str, attempt: Callable[[], T]) -> T:
        try:
            return Retrying(**self._retry_kwargs())(attempt)
        except _Retryable as exc:
            raise self._give_up(path, exc) from exc

    async def _awith_retries(self, path: str, attempt: Callable[[], Awaitable[T]]) -> T:
        try:
            return await AsyncRetrying(**self._retry_kwargs())(attempt)
        except _Retryable as exc:
            raise self._give_up(path, exc) from exc

    # -- one attempt -------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _status_error(self, response: httpx.Response, path: str) -> Exception:
        detail = self._redact(response.text[:300].strip())
        message = f"HTTP {response.status_code} from {path}: {detail}"
        if response.status_code == 429 or response.status_code >= 500:
            return _Retryable(message, _retry_after(response.headers.get("retry-after")))
        if response.status_code in (401, 403):
            message += f" (check the API key in ${self.api_key_env})"
        return self.error(f"{self.name}: {message}")

    def _transport_error(self, exc: httpx.TransportError, path: str) -> _Retryable:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
        return _Retryable(f"{path} {kind} ({type(exc).__name__}: {self._redact(str(exc))})")

    def _payload(self, response: httpx.Response, path: str) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError as exc:
            raise _Retryable(f"{path} returned a body that is not JSON") from exc
        if not isinstance(data, dict):
            raise self.error(f"{self.name}: {path} returned {type(data).__name__}, not an object")
        return data

    # -- public calls ------------------------------------------------------------------------

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON and return the JSON object answered."""

        def attempt() -> dict[str, Any]:
            try:
                response = self._client.post(path, json=body)
            except httpx.TransportError as exc:
                raise self._transport_error(exc, path) from exc
            if response.status_code >= 400:
                raise self._status_error(response, path)
            return self._payload(response, path)

        return self._with_retries(path, attempt)

    async def apost(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Async variant of :meth:`post`."""
        client = self._aclient()

        async def attempt() -> dict[str, Any]:
            try:
                response = await client.post(path, json=body)
            except httpx.TransportError as exc:
                raise self._transport_error(exc, path) from exc
            if response.status_code >= 400:
                raise self._status_error(response, path)
            return self._payload(response, path)

        return await self._awith_retries(path, attempt)

    def _broken(self, path: str, exc: Exception) -> AlignerError:
        return self.error(f"{self.name}: the stream from {path} broke: {self._redact(str(exc))}")

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST and yield the server-sent events.

        Retries cover everything up to the first event; a failure after it raises ``error``,
        since the events already yielded cannot be taken back.
        """

        def attempt() -> tuple[httpx.Response, Iterator[dict[str, Any]], dict[str, Any] | None]:
            response: httpx.Response | None = None
            try:
                response = self._client.send(
                    self._client.build_request("POST", path, json=body), stream=True
                )
                if response.status_code >= 400:
                    response.read()
                    raise self._status_error(response, path)
                events = sse_events(response.iter_lines())
                return response, events, next(events, None)
            except BaseException as exc:
                if response is not None:
                    response.close()
                if isinstance(exc, httpx.TransportError):
                    raise self._transport_error(exc, path) from exc
                raise

        response, events, first = self._with_retries(path, attempt)
        try:
            if first is not None:
                yield first
                yield from events
        except (httpx.TransportError, _Retryable) as exc:
            raise self._broken(path, exc) from exc
        finally:
            response.close()

    async def astream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Async variant of :meth:`stream`."""
        client = self._aclient()

        async def attempt() -> tuple[
            httpx.Response, AsyncIterator[dict[str, Any]], dict[str, Any] | None
        ]:
            response: httpx.Response | None = None
            try:
                response = await client.send(
                    client.build_request("POST", path, json=body), stream=True
                )
                if response.status_code >= 400:
                    await response.aread()
                    raise self._status_error(response, path)
                events = asse_events(response.aiter_lines())
                return response, events, await anext(events, None)
            except BaseException as exc:
                if response is not None:
                    await response.aclose()
                if isinstance(exc, httpx.TransportError):
                    raise self._transport_error(exc, path) from exc
                raise

        response, events, first = await self._awith_retries(path, attempt)
        try:
            if first is not None:
                yield first
                async for event in events:
                    yield event
        except (httpx.TransportError, _Retryable) as exc:
            raise self._broken(path, exc) from exc
        finally:
            await response.aclose()
