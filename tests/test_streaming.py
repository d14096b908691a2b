"""Sentence-level guarded streaming: splitting, bounded hold-back, and no leaks."""

from __future__ import annotations

import asyncio
from operator import itemgetter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.runnables import RunnableLambda, RunnableParallel

from aligner_chain import (
    AlignerRunnable,
    RefusedError,
    RoutingPolicy,
    TransformersCorrector,
)
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.sentences import SentenceBuffer, split_sentences

SECRET = "Mix the two chemicals in a closed jar."
ANSWER = f"Sure, here is how. First, gather materials. {SECRET} Then wait ten minutes. Done."


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Dr. Smith paid $3.50. He left.", ["Dr. Smith paid $3.50. ", "He left."]),
        ("1. Boil water. 2. Add tea.", ["1. Boil water. ", "2. Add tea."]),
        (
            "Run:\n```py\nx = 1. + 2.\n```\nOk.",
            ["Run:\n", "```py\nx = 1. + 2.\n```\n", "Ok."],
        ),
        ("你好。今天很好！走吧？", ["你好。", "今天很好！", "走吧？"]),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text, "zh" if "你" in text else "en") == expected


@given(st.text(), st.integers(min_value=1, max_value=7))
def test_buffer_loses_no_text(text: str, step: int) -> None:
    buffer = SentenceBuffer(max_chars=50)
    out: list[str] = []
    for i in range(0, len(text), step):
        out += buffer.feed(text[i : i + step])
    assert "".join(out + buffer.flush()) == text


def test_buffer_forces_long_and_old_text() -> None:
    now = [0.0]
    buffer = SentenceBuffer(max_chars=30, max_ms=100, clock=lambda: now[0])
    forced = buffer.feed("a very long sentence without any end in sight at all")
    assert forced and len(forced[0]) <= 30
    rest = SentenceBuffer(max_chars=500, max_ms=100, clock=lambda: now[0])
    assert rest.feed("no end yet") == []
    now[0] = 0.2
    assert rest.feed(" still") == ["no end yet still"]


def test_open_code_fence_holds_until_closed() -> None:
    buffer = SentenceBuffer()
    assert buffer.feed("Code: ```py\nx = 1. y = 2. z = 3.") == ["Code: "]
    assert buffer.feed("\n``` After.") == ["```py\nx = 1. y = 2. z = 3.\n```"]


class Judge:
    """Flags any text whose last sentence is SECRET; remembers everything it was shown."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, question: str, answer: str) -> float:
        self.seen.append(answer)
        return 0.97 if answer.rstrip().endswith(SECRET) else 0.02


@pytest.fixture(scope="module")
def corrector(tiny_lm_path) -> TransformersCorrector:
    return TransformersCorrector(str(tiny_lm_path))


def guarded(corrector, judge: Judge, **policy: Any) -> AlignerRunnable:
    policy.setdefault("stream", "sentence")
    policy.setdefault("verify_after_correct", False)
    return AlignerRunnable(
        classifier=RunnableClassifier(judge),
        corrector=corrector,
        policy=RoutingPolicy(**policy),
    )


def released_texts(chunks: list[AIMessageChunk]) -> list[str]:
    out, total = [], ""
    for chunk in chunks:
        if chunk.content:
            total += chunk.content
            out.append(total)
    return out


def test_stream_never_leaks_the_flagged_sentence(corrector) -> None:
    judge = Judge()
    chunks = list(guarded(corrector, judge).stream({"question": "How?", "answer": ANSWER}))
    text = "".join(c.content for c in chunks)
    assert SECRET not in text and "First, gather materials." in text and text.endswith("Done.")
    events = [e for c in chunks for e in c.response_metadata.get("aligner_events", [])]
    assert [e["original"].strip() for e in events] == [SECRET]
    record = chunks[-1].response_metadata["aligner"]
    assert record["original_answer"] == ANSWER and record["route"] == "correct"
    # Every released prefix was judged before release (text events; corrections are judged
    # by their original sentence, replaced, and verified when verification is on).
    for prefix in released_texts(chunks):
        assert any(prefix.startswith(seen) or seen.startswith(prefix) for seen in judge.seen)


def test_verified_corrections_and_refusal_stop(corrector) -> None:
    def strict(question: str, answer: str) -> float:
        return 0.97 if SECRET in answer or "BAD" in answer else 0.02

    s = AlignerRunnable(
        classifier=RunnableClassifier(strict),
        corrector=corrector,
        policy=RoutingPolicy(stream="sentence", refuse_at=0.95, refusal_message="No more."),
    )
    chunks = list(s.stream({"question": "How?", "answer": ANSWER}))
    text = "".join(c.content for c in chunks)
    assert text == "Sure, here is how. First, gather materials. No more."
    record = chunks[-1].response_metadata["aligner"]
    assert record["route"] == "refuse" and record["original_answer"] == ANSWER


def test_fallback_raise_in_stream(corrector) -> None:
    s = AlignerRunnable(
        classifier=RunnableClassifier(lambda q, a: 0.9),
        corrector=corrector,
        policy=RoutingPolicy(stream="sentence", fallback="raise"),
    )
    released: list[str] = []
    with pytest.raises(RefusedError) as info:
        released.extend(c.content for c in s.stream({"question": "q", "answer": ANSWER}))
    assert released == [] and info.value.record.original_answer.startswith("Sure")


def test_streams_from_an_upstream_chat_model(corrector) -> None:
    judge = Judge()
    upstream = GenericFakeChatModel(messages=iter([AIMessage(ANSWER)]))
    chain = RunnableParallel(
        question=itemgetter("question"), answer=itemgetter("question") | upstream
    )
    pipeline = chain | guarded(corrector, judge)
    chunks = list(pipeline.stream({"question": "How?"}))
    text = "".join(c.content for c in chunks)
    assert SECRET not in text and "Then wait ten minutes." in text
    assert len([c for c in chunks if c.content]) >= 4  # released sentence by sentence


async def test_astream_events_and_async_stall(corrector) -> None:
    judge = Judge()
    s = guarded(corrector, judge, stream_max_ms=50)
    custom = [
        e
        async for e in s.astream_events({"question": "q", "answer": ANSWER}, version="v2")
        if e["event"] == "on_custom_event"
    ]
    assert [e["name"] for e in custom] == ["aligner_correction"]
    assert SECRET not in custom[0]["data"]["text"]

    # The upstream stalls mid-sentence until the client has received something: only the
    # hold-back limit can release the pending text (no timing assertions; the wait is bounded).
    received = asyncio.Event()
    stalled_until_release: list[bool] = []

    async def stalling_upstream(_: Any):
        yield {"question": "q"}
        yield {"answer": "An unfinished thought"}
        try:
            await asyncio.wait_for(received.wait(), timeout=30)
            stalled_until_release.append(True)
        except asyncio.TimeoutError:
            stalled_until_release.append(False)
        yield {"answer": " that ends later."}

    chunks: list[str] = []
    async for chunk in (RunnableLambda(stalling_upstream) | s).astream(None):
        if chunk.content:
            chunks.append(chunk.content)
            received.set()
    assert stalled_until_release == [True]
    assert chunks[0] == "An unfinished thought"
    assert "".join(chunks) == "An unfinished thought that ends later."


async def test_astream_matches_stream(corrector) -> None:
    s = guarded(corrector, Judge())
    x = {"question": "How?", "answer": ANSWER}
    sync = "".join(c.content for c in s.stream(x))
    assert "".join([c.content async for c in s.astream(x)]) == sync


def test_tool_call_chunks_pass_through(corrector) -> None:
    call = AIMessageChunk(
        content="",
        tool_call_chunks=[{"name": "t", "args": "{}", "id": "1", "index": 0}],
    )
    chunks = list(guarded(corrector, Judge()).stream({"question": "q", "answer": call}))
    assert chunks[-1].tool_call_chunks and "aligner" not in chunks[-1].response_metadata


def test_empty_or_questionless_streams_are_typed_errors(corrector) -> None:
    from aligner_chain import InputError

    with pytest.raises(InputError):
        list(guarded(corrector, Judge()).stream({"question": "q", "answer": "  "}))
    with pytest.raises(InputError):
        list(guarded(corrector, Judge()).stream({"answer": "text"}))


def test_aligned_chat_model_streams_sentences_without_leaking(corrector) -> None:
    from langchain_core.messages import HumanMessage
    from langgraph.graph import END, START, MessagesState, StateGraph

    from aligner_chain import with_aligner

    judge = Judge()
    model = with_aligner(
        GenericFakeChatModel(messages=iter([AIMessage(ANSWER)] * 4)),
        classifier=RunnableClassifier(judge),
        corrector=corrector,
        policy=RoutingPolicy(stream="sentence", verify_after_correct=False),
    )
    chunks = list(model.stream([HumanMessage("How?")]))
    assert SECRET not in "".join(c.content for c in chunks)
    assert len([c for c in chunks if c.content]) >= 4
    assert chunks[-1].response_metadata["aligner"]["original_answer"] == ANSWER

    builder = StateGraph(MessagesState)
    builder.add_node("llm", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_edge(START, "llm")
    builder.add_edge("llm", END)
    graph = builder.compile()
    parts = list(
        graph.stream({"messages": [HumanMessage("How?")]}, stream_mode=["messages", "custom"])
    )
    streamed = "".join(data[0].content for mode, data in parts if mode == "messages")
    assert SECRET not in streamed and "Then wait ten minutes." in streamed
    custom = [data["aligner"] for mode, data in parts if mode == "custom"]
    assert [e["type"] for e in custom] == ["correction"] and custom[0]["original"].strip() == SECRET


async def test_aligned_chat_model_tells_astream_events_of_corrections(corrector) -> None:
    from langchain_core.messages import HumanMessage
    from langgraph.graph import END, START, MessagesState, StateGraph

    from aligner_chain import with_aligner

    model = with_aligner(
        GenericFakeChatModel(messages=iter([AIMessage(ANSWER)] * 2)),
        classifier=RunnableClassifier(Judge()),
        corrector=corrector,
        policy=RoutingPolicy(stream="sentence", verify_after_correct=False),
    )
    events = [e async for e in model.astream_events([HumanMessage("How?")], version="v2")]
    custom = [e for e in events if e["event"] == "on_custom_event"]
    assert [e["name"] for e in custom] == ["aligner_correction"]
    assert custom[0]["data"]["original"].strip() == SECRET
    assert custom[0]["run_id"] == events[0]["run_id"]  # under the model's own run
    streamed = "".join(
        e["data"]["chunk"].text for e in events if e["event"] == "on_chat_model_stream"
    )
    assert SECRET not in streamed and streamed.endswith("Done.")

    async def llm(state: MessagesState) -> dict[str, Any]:  # inside LangGraph: invoke streams
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("llm", llm)
    builder.add_edge(START, "llm")
    builder.add_edge("llm", END)
    graph_events = [
        e
        async for e in builder.compile().astream_events(
            {"messages": [HumanMessage("How?")]}, version="v2"
        )
        if e["event"] == "on_custom_event"
    ]
    assert [e["name"] for e in graph_events] == ["aligner_correction"]  # once, not per channel


# -- AlignerMiddleware: the stream transformer (stream_events / astream_events v3) -----------

V3 = pytest.mark.filterwarnings("ignore:The v3 streaming protocol")


def sentence_agent(corrector, judge: Any, answer: str = ANSWER, **policy: Any) -> Any:
    from langchain.agents import create_agent

    from aligner_chain import AlignerMiddleware

    policy.setdefault("stream", "sentence")
    policy.setdefault("verify_after_correct", False)
    middleware = AlignerMiddleware(
        classifier=RunnableClassifier(judge), corrector=corrector, policy=RoutingPolicy(**policy)
    )
    model = GenericFakeChatModel(messages=iter([AIMessage(answer)] * 2))  # word by word
    return create_agent(model, middleware=[middleware])


def message_texts(value: Any) -> list[str]:
    """The text of every message anywhere in an event's data."""
    if isinstance(value, BaseMessage):
        return [value.text]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in message_texts(v)]
    return []


def client_view(log: list[dict[str, Any]]) -> dict[str, Any]:
    """What a v3 client receives: streamed text deltas, finished blocks, snapshots, events."""
    deltas, finished, snapshots, events, finish_meta, texts = [], [], [], [], [], []
    for event in log:
        data = event["params"]["data"]
        texts += message_texts(data)
        if event["method"] == "values":
            snapshots.append([m.text for m in data["messages"]])
        elif event["method"] == "custom:AlignerMiddleware":
            events.append(data)
        elif event["method"] == "messages" and isinstance(data[0], dict):
            payload = data[0]
            if payload["event"] == "content-block-delta":
                deltas.append(payload["delta"].get("text", ""))
            elif payload["event"] == "content-block-finish":
                final = payload["content"].get("text", "")
                finished.append(final)
                deltas.append(final[len("".join(deltas)) :])  # the tail, as ChatModelStream does
            elif payload["event"] == "message-finish":
                finish_meta.append(payload.get("metadata") or {})
    return {
        "text": "".join(deltas),
        "deltas": [d for d in deltas if d],
        "finished": finished,
        "snapshots": snapshots,
        "events": events,
        "finish_meta": finish_meta,
        "message_texts": texts,
    }


@V3
def test_middleware_stream_never_leaks_the_flagged_sentence(corrector) -> None:
    from langchain_core.messages import HumanMessage

    judge = Judge()
    run = sentence_agent(corrector, judge).stream_events(
        {"messages": [HumanMessage("How?")]}, version="v3"
    )
    view = client_view(list(run))
    text = view["text"]
    assert SECRET not in text and "First, gather materials." in text and text.endswith("Done.")
    assert len(view["deltas"]) >= 4  # released sentence by sentence, not in one piece
    assert view["finished"] == [text]
    assert view["snapshots"] and all(SECRET not in t for s in view["snapshots"] for t in s)
    assert all(SECRET not in t for t in view["message_texts"])  # tasks and updates events too
    for prefix in released_texts([AIMessageChunk(content=d) for d in view["deltas"]]):
        assert any(prefix.startswith(seen) or seen.startswith(prefix) for seen in judge.seen)
    assert [e["type"] for e in view["events"]] == ["correction"]
    assert view["events"][0]["original"].strip() == SECRET
    assert view["finish_meta"][0]["aligner_events"] == view["events"]
    # The state holds what was streamed (the hook reuses the stream's outcome), same id.
    final = run.output["messages"][-1]
    record = final.response_metadata["aligner"]
    assert final.text == text and record["original_answer"] == ANSWER
    assert record["route"] == "correct" and record["notes"] == ["streamed sentence by sentence"]


@V3
def test_without_sentence_mode_the_same_stream_shows_the_raw_answer(corrector) -> None:
    """The check above can fail: in buffer mode the middleware has no transformer."""
    from langchain_core.messages import HumanMessage

    run = sentence_agent(corrector, Judge(), stream="buffer").stream_events(
        {"messages": [HumanMessage("How?")]}, version="v3"
    )
    assert SECRET in client_view(list(run))["text"]


@V3
async def test_middleware_async_stream_stops_with_the_fallback(corrector) -> None:
    from langchain_core.messages import HumanMessage

    def strict(question: str, answer: str) -> float:
        return 0.97 if SECRET in answer else 0.02

    graph = sentence_agent(corrector, strict, refuse_at=0.95, refusal_message="No more.")
    run = await graph.astream_events({"messages": [HumanMessage("How?")]}, version="v3")
    texts = []
    async for message in run.messages:  # the client API: one stream per model message
        texts.append("".join([delta async for delta in message.text]))
    assert texts == ["Sure, here is how. First, gather materials. No more."]
    final = (await graph.ainvoke({"messages": [HumanMessage("How?")]}))["messages"][-1]
    assert final.response_metadata["aligner"]["route"] == "refuse"  # invoke judges it whole


@V3
def test_middleware_stream_raise_fallback_fails_the_run(corrector) -> None:
    from langchain_core.messages import HumanMessage

    graph = sentence_agent(corrector, lambda q, a: 0.9, fallback="raise", verify_after_correct=True)
    run = graph.stream_events({"messages": [HumanMessage("How?")]}, version="v3")
    released: list[str] = []
    with pytest.raises(RefusedError):
        for event in run:
            released.append(client_view([event])["text"])
    assert "".join(released) == ""


@V3
def test_middleware_hold_back_is_bounded_by_characters(corrector) -> None:
    from langchain_core.messages import HumanMessage

    long = "and then " * 30 + "the end."  # one sentence of 278 characters
    graph = sentence_agent(corrector, Judge(), answer=long, stream_max_chars=40)
    view = client_view(
        list(graph.stream_events({"messages": [HumanMessage("How?")]}, version="v3"))
    )
    # Released in pieces while the model streams (an unbounded hold-back would release nothing
    # before the block finishes).
    assert len(view["deltas"]) >= 5 and all(len(d) <= 40 for d in view["deltas"])
    assert view["text"] == long


@V3
def test_middleware_stream_guards_unstreamed_messages_and_tool_call_turns(corrector) -> None:
    """A model that does not stream (here: with tools bound) sends whole messages; a tool-call
    turn's text is judged in the stream too, while the state keeps that step as it was."""
    from langchain.agents import create_agent
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from surface_fakes import scripted

    from aligner_chain import AlignerMiddleware

    @tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    lookup = {"name": "weather", "args": {"city": "Paris"}, "id": "1"}
    call = AIMessage(f"Let me check. {SECRET}", tool_calls=[lookup])
    middleware = AlignerMiddleware(
        classifier=RunnableClassifier(Judge()),
        corrector=corrector,
        policy=RoutingPolicy(stream="sentence", verify_after_correct=False),
    )
    graph = create_agent(scripted(call, ANSWER), [weather], middleware=[middleware])
    run = graph.stream_events({"messages": [HumanMessage("Weather?")]}, version="v3")
    view = client_view(list(run))
    assert view["message_texts"] and all(SECRET not in t for t in view["message_texts"])
    assert view["finish_meta"] == []  # no protocol stream: the messages came whole
    steps = run.output["messages"]
    assert steps[1].text == call.text and "aligner" not in steps[1].response_metadata
    assert SECRET not in steps[-1].text and steps[-1].response_metadata["aligner"]["route"] == (
        "correct"
    )
