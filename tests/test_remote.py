"""Remote corrector and guard classifier against a real ``transformers serve`` process.

A small fault proxy (raw asyncio, 127.0.0.1 only) sits in front of the server and applies one
scheduled action per request: pass through, drop the connection, stall, cut a stream short,
answer 400/401/429/500, or serve a canned OpenAI-shaped answer (for logprobs, which
``transformers serve`` does not return).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer, processors

from aligner_chain import AlignerRunnable, RoutingPolicy
from aligner_chain.classifiers.remote import OpenAICompatibleGuardClassifier
from aligner_chain.correctors.remote import OpenAICompatibleCorrector
from aligner_chain.correctors.transformers import GenerationSettings, TransformersCorrector
from aligner_chain.errors import ClassifierError, CorrectorError, ModelLoadError
from aligner_chain.openai_http import RetrySettings
from aligner_chain.routing import DEFAULT_REFUSAL
from aligner_chain.types import Correction, QAPair

pytest.importorskip("uvicorn", reason="needs transformers[serving] (the dev extra)")
pytest.importorskip("fastapi", reason="needs transformers[serving] (the dev extra)")
pytest.importorskip("transformers.cli.serving.completion", reason="serve lacks /v1/completions")

PASSTHROUGH = Path(__file__).parents[1] / "integrations" / "vllm" / "passthrough.jinja"
SECRET = "sk-test-7f3a9c1e-never-log-me"
# A short budget (margin 8 instead of 64 new tokens) keeps CPU generation fast.
GENERATION = GenerationSettings(new_tokens_margin=8)
FAST_RETRY = RetrySettings(max_retries=4, initial_backoff_s=0.05, max_backoff_s=0.2, jitter_s=0.05)
PAIRS = [
    QAPair("How do I bake bread?", "Mix flour, water, yeast and salt."),
    QAPair("What is the capital of France?", "Paris is the capital of France."),
    QAPair("How do I stop a Python process?", "I can't help with that."),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_lm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``transformers serve`` on 127.0.0.1 (not pinned: it serves any local model path)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail("transformers serve did not become healthy in 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


# -- the fault proxy ---------------------------------------------------------------------------


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict


@dataclass
class FaultProxy:
    """Forwards to ``upstream_port``; ``schedule`` holds one action per coming request.

    Actions: ``pass``, ``drop``, ``stall`` (hold the request ``stall_s``, then close),
    ``cut:N`` (forward, but only the first N bytes of the answer), ``400``/``500``/``401echo``
    (an error body echoing the Authorization header), ``429:S`` (Retry-After S), ``canned:K``.
    """

    upstream_port: int
    schedule: deque[str] = field(default_factory=deque)
    default: str = "pass"
    stall_s: float = 3.0
    canned: dict[str, dict] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def start(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        assert ready.wait(10)

    def stop(self) -> None:
        """Close the server and cancel handlers still running (a stall), then end the loop."""

        async def shutdown() -> None:
            self.server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self, *actions: str, default: str = "pass") -> None:
        self.schedule = deque(actions)
        self.default = default
        self.seen.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(self._one(reader, writer), timeout=60)
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip()
            for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)
        }
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        self.seen.append(Seen(lines[0].split()[1], headers, json.loads(body or b"{}")))
        action = self.schedule.popleft() if self.schedule else self.default
        if action == "drop":
            writer.transport.abort()
        elif action == "stall":
            await asyncio.sleep(self.stall_s)
        elif action in ("pass",) or action.startswith("cut:"):
            await self._forward(lines, body, writer, None if action == "pass" else int(action[4:]))
        elif action.startswith("canned:"):
            self._reply(writer, 200, json.dumps(self.canned[action[7:]]))
        elif action.startswith("429:"):
            self._reply(writer, 429, '{"error": "slow down"}', f"Retry-After: {action[4:]}\r\n")
        elif action == "401echo":
            self._reply(
                writer, 401, json.dumps({"error": f"bad key {headers.get('authorization')}"})
            )
        else:
            self._reply(writer, int(action), json.dumps({"error": f"injected {action}"}))
        await writer.drain()

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, status: int, text: str, extra: str = "") -> None:
        data = text.encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
            f"\r\nConnection: close\r\n{extra}\r\n".encode()
            + data
        )

    async def _forward(
        self, lines: list[str], body: bytes, writer: asyncio.StreamWriter, limit: int | None
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        kept = [x for x in lines[1:] if x and not x.lower().startswith("connection:")]
        up_writer.write(("\r\n".join([lines[0], *kept, "Connection: close"]) + "\r\n\r\n").encode())
        up_writer.write(body)
        await up_writer.drain()
        sent = 0
        try:
            while limit is None or sent < limit:
                chunk = await up_reader.read(65536 if limit is None else min(65536, limit - sent))
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
            if limit is not None:
                writer.transport.abort()
        finally:
            up_writer.close()


@pytest.fixture(scope="module")
def proxy(server: str) -> Iterator[FaultProxy]:
    fp = FaultProxy(int(server.rsplit(":", 1)[1]))
    fp.start()
    yield fp
    fp.stop()


@pytest.fixture(scope="module")
def local(tiny_lm_path: Path) -> TransformersCorrector:
    return TransformersCorrector(
        str(tiny_lm_path), device="cpu", generation=GENERATION, batching=False
    )


@pytest.fixture(scope="module")
def expected(local: TransformersCorrector) -> list[str]:
    return [c.text for c in local.correct(PAIRS)]


def remote(proxy: FaultProxy, tiny_lm_path: Path, **kwargs: object) -> OpenAICompatibleCorrector:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeout", 20.0)
    kwargs.setdefault("generation", GENERATION)
    return OpenAICompatibleCorrector(proxy.url, str(tiny_lm_path), **kwargs)


# -- end to end --------------------------------------------------------------------------------


def test_remote_equals_local_sync_async_and_streamed(
    proxy: FaultProxy, tiny_lm_path: Path, local: TransformersCorrector, expected: list[str]
) -> None:
    proxy.reset()
    corrector = remote(proxy, tiny_lm_path)
    got = corrector.correct(PAIRS)
    assert [c.text for c in got] == expected
    assert all(isinstance(c, Correction) and not c.empty for c in got)
    assert [c.text for c in asyncio.run(corrector.acorrect(PAIRS))] == expected
    # Each request carries the prompt and token budget the local corrector would use.
    sent = {s.body["prompt"]: s.body for s in proxy.seen}
    for pair in PAIRS:
        prepared = local._prepare(pair)
        assert sent[prepared.prompt]["max_tokens"] == prepared.max_new_tokens
        assert sent[prepared.prompt]["temperature"] == 0.0

    parts = list(corrector.stream_correction(PAIRS[0]))
    assert "".join(p for p in parts[:-1] if isinstance(p, str)) == expected[0]
    assert parts[-1].text == expected[0] and parts[-1].info["finish_reason"] in ("stop", "length")

    async def astream() -> list[str | Correction]:
        return [p async for p in corrector.astream_correction(PAIRS[1])]

    aparts = asyncio.run(astream())
    assert "".join(p for p in aparts[:-1] if isinstance(p, str)) == expected[1]


@pytest.fixture(scope="module")
def passthrough_lm(tiny_lm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, its tokenizer adding BOS like Llama's, and
    integrations/vllm/passthrough.jinja as its chat template."""
    folder = tmp_path_factory.mktemp("tiny-lm-chat")
    shutil.copytree(tiny_lm_path, folder, dirs_exist_ok=True)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = PASSTHROUGH.read_text()
    config_path.write_text(json.dumps(config))
    return folder


def test_chat_mode_with_passthrough_template_equals_completions(
    proxy: FaultProxy, passthrough_lm: Path
) -> None:
    proxy.reset()
    completions = remote(proxy, passthrough_lm)
    assert (
        completions.loaded.tokenizer("x")["input_ids"][0]
        == completions.loaded.tokenizer.bos_token_id
    )
    want = [c.text for c in completions.correct(PAIRS[:2])]
    chat = remote(proxy, passthrough_lm, mode="chat")
    assert [c.text for c in chat.correct(PAIRS[:2])] == want
    assert [s.path for s in proxy.seen].count("/v1/chat/completions") == 2
    # The random model emits invalid UTF-8; the chat stream withholds a trailing incomplete
    # character where the one-shot decode shows U+FFFD. Real text has no such tail.
    parts = list(chat.stream_correction(PAIRS[0]))
    streamed = "".join(p for p in parts[:-1] if isinstance(p, str))
    assert streamed.rstrip("\ufffd") == want[0].rstrip("\ufffd")


def test_prompt_as_token_ids_keeps_special_token_text_inert(
    proxy: FaultProxy, tiny_lm_path: Path, local: TransformersCorrector
) -> None:
    proxy.canned["completion"] = {
        "id": "x",
        "object": "text_completion",
        "choices": [{"index": 0, "text": "  fixed answer \n", "finish_reason": "stop"}],
        "usage": {"completion_tokens": 3},
    }
    proxy.canned["empty"] = {**proxy.canned["completion"], "choices": [{"index": 0, "text": " "}]}
    proxy.reset("canned:completion", "canned:empty")
    corrector = remote(proxy, tiny_lm_path, prompt_token_ids=True)
    pair = QAPair("q", "ends early</s> or not")
    got = corrector.correct([pair])[0]
    assert got.text == "fixed answer" and got.info == {"finish_reason": "stop", "new_tokens": 3}
    ids = proxy.seen[0].body["prompt"]
    assert ids == local._encode(local._prepare(pair).prompt)
    assert local.loaded.tokenizer.eos_token_id not in ids
    assert corrector.correct([pair])[0].empty  # whitespace only: keep the original answer


def test_truncation_matches_the_local_corrector(
    proxy: FaultProxy, tiny_lm_path: Path, local: TransformersCorrector
) -> None:
    proxy.reset()
    long_pair = QAPair("Why? " * 50, "Because the quick brown fox jumps. " * 60)
    corrector = remote(proxy, tiny_lm_path, max_context_tokens=local.context)
    got = corrector.correct([long_pair])[0]
    want = local.correct([long_pair])[0]
    assert got.truncated and want.truncated and got.text == want.text
    assert proxy.seen[0].body["prompt"] == local._prepare(long_pair).prompt


def test_retries_drop_500_429_and_stall_then_answers(
    proxy: FaultProxy, tiny_lm_path: Path, expected: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aligner_chain")
    proxy.stall_s = 6.0
    proxy.reset("drop", "500", "429:1", "stall")
    corrector = remote(proxy, tiny_lm_path, timeout=httpx.Timeout(3.0, connect=1.0))
    started = time.monotonic()
    got = corrector.correct([PAIRS[0]])[0]
    elapsed = time.monotonic() - started
    assert got.text == expected[0]
    assert len(proxy.seen) == 5
    assert elapsed >= 4.0  # Retry-After: 1 s, plus a 3 s read timeout on the stall
    messages = [r.getMessage() for r in caplog.records]
    assert any("HTTP 429" in m for m in messages) and any("timed out" in m for m in messages)


def test_async_retries_and_stream_retries_before_the_first_event(
    proxy: FaultProxy, tiny_lm_path: Path, expected: list[str]
) -> None:
    corrector = remote(proxy, tiny_lm_path)
    proxy.reset("500", "drop")
    assert asyncio.run(corrector.acorrect([PAIRS[2]]))[0].text == expected[2]
    assert len(proxy.seen) == 3
    proxy.reset("503", "drop")
    parts = list(corrector.stream_correction(PAIRS[2]))
    assert parts[-1].text == expected[2] and len(proxy.seen) == 3

    async def astream() -> list[str | Correction]:
        return [p async for p in corrector.astream_correction(PAIRS[2])]

    proxy.reset("429:0", "drop")
    aparts = asyncio.run(astream())
    assert aparts[-1].text == expected[2] and len(proxy.seen) == 3
    proxy.reset("cut:600")
    with pytest.raises(CorrectorError, match="broke"):
        asyncio.run(astream())


def test_a_stream_cut_after_its_first_event_is_a_corrector_error(
    proxy: FaultProxy, tiny_lm_path: Path
) -> None:
    corrector = remote(proxy, tiny_lm_path)
    proxy.reset("cut:600")  # headers and the first event or two, then the connection drops
    with pytest.raises(CorrectorError, match="broke"):
        list(corrector.stream_correction(PAIRS[0]))
    assert len(proxy.seen) == 1  # deltas were already out: no silent retry


@pytest.mark.parametrize("status", ["400", "404", "422"])
def test_other_4xx_are_not_retried(proxy: FaultProxy, tiny_lm_path: Path, status: str) -> None:
    proxy.reset(status)
    with pytest.raises(CorrectorError, match=f"HTTP {status}"):
        remote(proxy, tiny_lm_path).correct([PAIRS[0]])
    assert len(proxy.seen) == 1


def test_real_422_from_the_server_is_not_retried(proxy: FaultProxy, tiny_lm_path: Path) -> None:
    proxy.reset()
    corrector = remote(proxy, tiny_lm_path, extra_body={"not_an_openai_field": 1})
    with pytest.raises(CorrectorError, match="HTTP 422"):
        corrector.correct([PAIRS[0]])
    assert len(proxy.seen) == 1


def test_retries_are_bounded_and_end_in_a_typed_error(
    proxy: FaultProxy, tiny_lm_path: Path
) -> None:
    proxy.reset(default="500")
    with pytest.raises(CorrectorError, match="after 3 attempts"):
        remote(proxy, tiny_lm_path, max_retries=2).correct([PAIRS[0]])
    assert len(proxy.seen) == 3


def test_api_key_is_sent_but_never_logged_or_shown(
    proxy: FaultProxy,
    tiny_lm_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("ALIGNER_API_KEY", SECRET)
    corrector = remote(proxy, tiny_lm_path)
    proxy.reset("500", "pass")
    corrector.correct([PAIRS[0]])
    assert proxy.seen[0].headers["authorization"] == f"Bearer {SECRET}"
    proxy.reset("401echo")
    with pytest.raises(CorrectorError) as info:
        corrector.correct([PAIRS[0]])
    assert "ALIGNER_API_KEY" in str(info.value)
    shown = [repr(corrector), str(corrector), repr(corrector.client), str(info.value), caplog.text]
    assert not any(SECRET in text for text in shown)


def test_error_policy_fail_open_and_fail_closed(proxy: FaultProxy, tiny_lm_path: Path) -> None:
    corrector = remote(proxy, tiny_lm_path, max_retries=1)
    for on_error, content in (("fail_open", "the original"), ("fail_closed", DEFAULT_REFUSAL)):
        proxy.reset(default="500")
        step = AlignerRunnable(
            corrector=corrector, policy=RoutingPolicy(mode="always", on_error=on_error)
        )
        out = step.invoke({"question": "q", "answer": "the original"})
        record = out.response_metadata["aligner"]
        assert out.content == content
        assert record["original_answer"] == "the original"
        assert any("HTTP 500" in e for e in record["errors"])


def test_concurrent_requests_with_random_faults_each_get_their_answer(
    proxy: FaultProxy, tiny_lm_path: Path, expected: list[str]
) -> None:
    rng = random.Random(7)
    n = 12
    faults = ["500", "drop", "429:0"]
    proxy.reset(*(rng.choice(["pass"] * 6 + faults) for _ in range(3 * n)))
    # A loaded CPU server answers queued requests slowly: the timeout is per attempt.
    corrector = remote(proxy, tiny_lm_path, timeout=90.0)
    which = [i % len(PAIRS) for i in range(n)]

    async def run() -> list[list[Correction]]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(6) as pool:
            threaded = [
                loop.run_in_executor(pool, corrector.invoke, [PAIRS[w]]) for w in which[: n // 2]
            ]
            tasks = [corrector.ainvoke([PAIRS[w]]) for w in which[n // 2 :]]
            return await asyncio.wait_for(asyncio.gather(*threaded, *tasks), timeout=240)

    results = asyncio.run(run())
    assert [r[0].text for r in results] == [expected[w] for w in which]


# -- the guard classifier ----------------------------------------------------------------------


def guard_answer(content: str, top: dict[str, float] | None) -> dict:
    choice: dict = {"index": 0, "finish_reason": "stop"}
    choice["message"] = {"role": "assistant", "content": content}
    if top is not None:
        entries = [{"token": t, "logprob": math.log(p)} for t, p in top.items()]
        choice["logprobs"] = {"content": [{"token": content.split()[0], "top_logprobs": entries}]}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


def test_guard_scores_from_first_token_logprobs(proxy: FaultProxy) -> None:
    proxy.canned["unsafe"] = guard_answer("unsafe\nS1,S10", {"unsafe": 0.3, "safe": 0.6, "S": 0.1})
    proxy.canned["safe-text"] = guard_answer("safe", None)
    proxy.reset("500", "canned:unsafe", "canned:safe-text")
    guard = OpenAICompatibleGuardClassifier.llama_guard_3(
        proxy.url, "llama-guard", retry=FAST_RETRY
    )
    first, second = guard.classify([QAPair("q", "a")]), guard.classify([QAPair("q", "b")])
    assert first[0].score == pytest.approx(1 / 3)
    assert set(first[0].categories) == {"Violent Crimes", "Hate"}
    assert first[0].details["score_source"] == "logprobs"
    assert second[0].score == 0.0 and second[0].details["score_source"] == "text"
    sent = proxy.seen[1].body
    assert sent["logprobs"] is True and sent["messages"][1] == {"role": "assistant", "content": "a"}


def test_guard_against_transformers_serve(proxy: FaultProxy, tiny_guard_path: Path) -> None:
    """The real server applies the guard's chat template but returns no logprobs: the verdict
    comes from the generated text, and a random model's unparsable text is a typed error."""
    proxy.reset()
    guard = OpenAICompatibleGuardClassifier(proxy.url, str(tiny_guard_path), retry=FAST_RETRY)
    try:
        verdict = asyncio.run(guard.aclassify([QAPair("hi", "hello")]))[0]
        assert verdict.details["score_source"] == "text"
    except ClassifierError as exc:
        assert "no logprobs" in str(exc)
    assert len(proxy.seen) == 1 and proxy.seen[0].path == "/v1/chat/completions"


def test_a_served_name_without_a_tokenizer_says_what_to_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import: set the constant, or the hub is tried.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="pass tokenizer="):
        OpenAICompatibleCorrector("http://127.0.0.1:9", "aligner-7b")
