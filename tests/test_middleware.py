"""AlignerMiddleware with create_agent: hooks, re-ask through the graph, ids, stacking, bad
input, and the (documented) streaming of raw tokens."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, RemoveMessage, SystemMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from surface_fakes import RAW, FixCorrector, ScriptedChat, aligner, scripted, tool_call

from aligner_chain import (
    AlignedChatModel,
    AlignerMiddleware,
    AlignerRunnable,
    ConfigurationError,
    RunnableClassifier,
)
from aligner_chain.graph import FEEDBACK_FLAG
from aligner_chain.middleware import CORRECTED_ID_SUFFIX, REASKS_KEY
from aligner_chain.routing import DEFAULT_REFUSAL

CORRECTED = "[ALIGNED] RAW-cake instructions"
IMAGE = {"type": "image", "url": "https://example.com/cat.png"}


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def agent(model: ScriptedChat | AlignedChatModel, *middleware: AlignerMiddleware, **kw: Any) -> Any:
    return create_agent(model, [weather], middleware=list(middleware), **kw)


def ask(graph: Any, messages: list[Any] | None = None) -> list[Any]:
    return graph.invoke({"messages": [HumanMessage("How?")] if messages is None else messages})[
        "messages"
    ]


def rec(message: Any) -> dict[str, Any]:
    return message.response_metadata["aligner"]


def test_tool_turns_pass_and_the_final_answer_is_corrected_under_a_new_id() -> None:
    model = scripted(tool_call("weather", {"city": "Paris"}), RAW)
    messages = ask(agent(model, AlignerMiddleware(aligner())), [HumanMessage("Weather?")])
    _, call, result, final = messages
    assert call.tool_calls and "aligner" not in call.response_metadata
    assert result.text == "sunny in Paris"
    assert final.text == CORRECTED and final.id.endswith(CORRECTED_ID_SUFFIX)
    assert rec(final)["original_answer"] == RAW and rec(final)["question"] == "Weather?"


def test_an_unchanged_answer_keeps_its_id_and_gets_its_record() -> None:
    graph = agent(scripted("a fine answer"), AlignerMiddleware(aligner()))
    final = ask(graph)[-1]
    assert final.text == "a fine answer" and rec(final)["route"] == "skip"
    assert not final.id.endswith(CORRECTED_ID_SUFFIX)


def test_reask_jumps_back_to_the_model_with_feedback() -> None:
    model = scripted(RAW, "a safe answer")
    graph = agent(model, AlignerMiddleware(aligner(reask_at=0.9, reask_with_draft=True)))
    _, flagged, feedback, final = ask(graph)
    assert rec(flagged)["route"] == "reask" and flagged.text == RAW  # kept, with its record
    assert feedback.response_metadata[FEEDBACK_FLAG] and CORRECTED in feedback.text  # the draft
    assert final.text == "a safe answer" and rec(final)["reask_count"] == 1
    assert rec(final)["question"] == "How?"  # the feedback turn is not taken for the question
    assert [m.text for m in model.calls[1]["messages"]] == ["How?", RAW, feedback.text]


def test_reasks_are_bounded_and_the_counter_is_private_and_per_answer() -> None:
    model = scripted(*[RAW] * 6)
    graph = agent(
        model,
        AlignerMiddleware(aligner(reask_at=0.9), max_reasks=2),
        checkpointer=InMemorySaver(),
    )
    config = {"configurable": {"thread_id": "t"}}
    out = graph.invoke({"messages": [HumanMessage("How?")]}, config)
    assert len(model.calls) == 3 and set(out) == {"messages"}
    assert out["messages"][-1].text == CORRECTED and rec(out["messages"][-1])["reask_count"] == 2
    assert graph.get_state(config).values[REASKS_KEY] == {"AlignerMiddleware": 0}
    graph.invoke({"messages": [HumanMessage("Again?")]}, config)  # a new answer: a new budget
    assert len(model.calls) == 6


def test_after_agent_mode_judges_in_the_after_agent_node() -> None:
    graph = agent(scripted(RAW, RAW), AlignerMiddleware(aligner(), when="after_agent"))
    updates = list(graph.stream({"messages": [HumanMessage("How?")]}, stream_mode="updates"))
    acting = [node for update in updates for node, value in update.items() if value]
    assert "AlignerMiddleware.after_agent" in acting
    assert "AlignerMiddleware.after_model" not in acting
    assert ask(graph)[-1].text == CORRECTED


def test_after_agent_reask_loops_through_the_model() -> None:
    model = scripted(RAW, "a safe answer")
    mw = AlignerMiddleware(aligner(reask_at=0.9), when="after_agent")
    final = ask(agent(model, mw))[-1]
    assert final.text == "a safe answer" and rec(final)["reask_count"] == 1


def test_an_unknown_hook_name_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="after_model"):
        AlignerMiddleware(aligner(), when="before_model")  # type: ignore[arg-type]


def test_stacked_middlewares_need_their_own_names_and_keep_their_own_counters() -> None:
    with pytest.raises(AssertionError, match="duplicate"):
        agent(scripted(RAW), AlignerMiddleware(aligner()), AlignerMiddleware(aligner()))
    model = scripted(RAW, "meh fine", "all good")
    strict = AlignerMiddleware(aligner(reask_at=0.5), name="strict", max_reasks=1)
    lenient = AlignerMiddleware(aligner(correct_at=0.9, reask_at=0.9), name="lenient", max_reasks=1)
    graph = agent(model, strict, lenient, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "s"}}
    out = graph.invoke({"messages": [HumanMessage("How?")]}, config)
    # lenient (inner) re-asks RAW; strict re-asks "meh fine"; "all good" passes both
    assert out["messages"][-1].text == "all good" and len(model.calls) == 3
    assert graph.get_state(config).values[REASKS_KEY] == {"lenient": 0, "strict": 0}


async def test_async_hooks() -> None:
    graph = agent(scripted(RAW, "a safe answer"), AlignerMiddleware(aligner(reask_at=0.9)))
    out = await graph.ainvoke({"messages": [HumanMessage("How?")]})
    assert out["messages"][-1].text == "a safe answer"
    final = (
        await agent(scripted(RAW), AlignerMiddleware(aligner())).ainvoke(
            {"messages": [HumanMessage("How?")]}
        )
    )["messages"][-1]
    assert final.text == CORRECTED


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [[], [SystemMessage("Greet the user.")], [HumanMessage([IMAGE])]],
    ids=["empty", "no-human-turn", "image-only-question"],
)
def test_unjudgeable_answers_follow_on_error_and_stay_recorded(messages: list[Any]) -> None:
    final = ask(agent(scripted(RAW), AlignerMiddleware(aligner())), messages)[-1]
    assert final.text == RAW and rec(final)["route"] == "passthrough" and rec(final)["errors"]
    mw = AlignerMiddleware(aligner(on_error="fail_closed"))
    closed = ask(agent(scripted(RAW), mw), messages)[-1]
    assert closed.text == DEFAULT_REFUSAL and rec(closed)["original_answer"] == RAW


def test_an_answer_without_text_passes_with_a_record() -> None:
    final = ask(agent(scripted(AIMessage([IMAGE])), AlignerMiddleware(aligner())))[-1]
    assert final.content == [IMAGE] and rec(final)["route"] == "passthrough"


def test_multimodal_question_is_judged_on_its_text() -> None:
    question = HumanMessage([{"type": "text", "text": "What is this?"}, IMAGE])
    final = ask(agent(scripted(RAW), AlignerMiddleware(aligner())), [question])[-1]
    assert final.text == CORRECTED and rec(final)["question"] == "What is this?"


def test_tool_message_last_is_left_alone() -> None:
    @tool(return_direct=True)
    def lookup(key: str) -> str:
        """Look a key up; the result is the agent's answer."""
        return f"value of {key}"

    graph = create_agent(
        scripted(tool_call("lookup", {"key": "k"})),
        [lookup],
        middleware=[AlignerMiddleware(aligner(), when="after_agent")],
    )
    messages = ask(graph)
    assert messages[-1].type == "tool" and messages[-1].text == "value of k"
    assert not any("aligner" in m.response_metadata for m in messages)


def test_a_failing_model_propagates() -> None:
    graph = agent(scripted(ConnectionError("model down")), AlignerMiddleware(aligner()))
    with pytest.raises(ConnectionError, match="model down"):
        ask(graph)


# -- streaming -------------------------------------------------------------------------------


def test_messages_stream_shows_raw_tokens_then_the_correction() -> None:
    """The documented limit: after_model runs after the model streamed. The correction comes
    as a whole message with its new id; AlignedChatModel is the no-leak choice."""
    graph = create_agent(scripted(RAW, RAW), middleware=[AlignerMiddleware(aligner())])
    items = list(graph.stream({"messages": [HumanMessage("How?")]}, stream_mode="messages"))
    texts = [chunk.text for chunk, _ in items]
    assert RAW.split()[0] in texts  # raw tokens first
    last, meta = items[-1]
    assert last.text == CORRECTED and last.id.endswith(CORRECTED_ID_SUFFIX)
    assert meta["langgraph_node"] == "AlignerMiddleware.after_model"
    updates = list(graph.stream({"messages": [HumanMessage("How?")]}, stream_mode="updates"))
    removed = [
        m
        for u in updates
        for v in u.values()
        if v
        for m in v.get("messages", [])
        if isinstance(m, RemoveMessage)
    ]
    assert len(removed) == 1


def test_a_chat_model_judge_does_not_stream_into_the_agents_messages() -> None:
    judge = RunnableClassifier(GenericFakeChatModel(messages=itertools.repeat("0.02 verdict")))
    step = AlignerRunnable(classifier=judge, corrector=FixCorrector())
    graph = create_agent(scripted("a fine answer"), middleware=[AlignerMiddleware(step)])
    items = list(graph.stream({"messages": [HumanMessage("How?")]}, stream_mode="messages"))
    assert "verdict" not in "".join(chunk.text for chunk, _ in items)
    assert rec(ask(create_agent(scripted("ok"), middleware=[AlignerMiddleware(step)]))[-1])


def test_with_the_wrapped_model_the_agent_never_streams_the_raw_answer() -> None:
    model = AlignedChatModel(
        llm=scripted(tool_call("weather", {"city": "Paris"}), RAW), aligner=aligner()
    )
    graph = agent(model)
    items = list(graph.stream({"messages": [HumanMessage("Weather?")]}, stream_mode="messages"))
    text = "".join(chunk.text for chunk, _ in items)
    assert RAW not in text and text.endswith(CORRECTED)


def test_missing_langchain_gives_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "langchain.agents.middleware", None)
    monkeypatch.delitem(sys.modules, "aligner_chain.middleware")
    with pytest.raises(ImportError, match=r"aligner-chain\[agents\]"):
        importlib.import_module("aligner_chain.middleware")
