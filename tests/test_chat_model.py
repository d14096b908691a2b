"""AlignedChatModel: routes, re-ask, tools, streaming without leaks, bad input, standard tests."""

from __future__ import annotations

import itertools
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler, get_usage_metadata_callback
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.runnables import RunnableBinding
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from langgraph.graph import START, MessagesState, StateGraph
from pydantic import BaseModel
from surface_fakes import RAW, FixCorrector, ScriptedChat, aligner, judge, scripted, tool_call

from aligner_chain import (
    AlignedChatModel,
    AlignerRunnable,
    ConfigurationError,
    InputError,
    RefusedError,
    RoutingPolicy,
    TransformersCorrector,
    with_aligner,
)
from aligner_chain.classifiers.runnable import RunnableClassifier
from aligner_chain.correctors.transformers import GenerationSettings
from aligner_chain.routing import DEFAULT_REFUSAL

IMAGE = {"type": "image", "url": "https://example.com/cat.png"}


def wrapped(*script: Any, **policy: Any) -> AlignedChatModel:
    return AlignedChatModel(llm=scripted(*script), aligner=aligner(**policy))


def rec(message: AIMessage) -> dict[str, Any]:
    return message.response_metadata["aligner"]


# -- routes ----------------------------------------------------------------------------------


def test_flagged_answer_is_corrected_and_the_original_recorded() -> None:
    out = wrapped(RAW).invoke("How?")
    assert out.content == "[ALIGNED] RAW-cake instructions"
    r = rec(out)
    assert r["route"] == "correct" and r["original_answer"] == RAW and r["question"] == "How?"
    assert r["changed"] and r["verdict_before"]["score"] == pytest.approx(0.95)


def test_clean_answer_keeps_its_content_blocks() -> None:
    blocks = [{"type": "text", "text": "A cat."}, IMAGE]
    out = wrapped(AIMessage(blocks)).invoke("Show me a cat")
    assert out.content == blocks and rec(out)["route"] == "skip" and not rec(out)["changed"]


def test_tool_call_turns_pass_untouched_and_tools_reach_the_inner_model() -> None:
    def weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    model = AlignedChatModel(
        llm=scripted(tool_call("weather", {"city": "Paris"})), aligner=aligner()
    )
    bound = model.bind_tools([weather], tool_choice="any")
    assert isinstance(bound, RunnableBinding)
    out = bound.invoke("Weather in Paris?")
    assert out.tool_calls[0]["args"] == {"city": "Paris"} and "aligner" not in out.response_metadata
    call = model.llm.calls[0]
    assert call["tools"][0]["function"]["name"] == "weather" and call["tool_choice"] == "any"


def test_agent_loop_final_answer_is_aligned_with_the_human_question() -> None:
    model = wrapped(RAW)
    history = [
        HumanMessage("Weather?"),
        tool_call("weather", {"city": "Paris"}),
        ToolMessage("sunny", tool_call_id="call-1"),
    ]
    out = model.invoke(history)
    assert rec(out)["question"] == "Weather?" and rec(out)["route"] == "correct"


def test_refusal_band_and_raise_fallback() -> None:
    assert wrapped(RAW, refuse_at=0.9).invoke("q").content == DEFAULT_REFUSAL
    never_safe = AlignerRunnable(
        classifier=RunnableClassifier(lambda q, a: 0.9),
        corrector=FixCorrector(),
        policy=RoutingPolicy(fallback="raise"),
    )
    with pytest.raises(RefusedError) as err:
        AlignedChatModel(llm=scripted(RAW), aligner=never_safe).invoke("q")
    assert err.value.record.original_answer == RAW


def test_parts_or_aligner_but_not_both() -> None:
    model = with_aligner(
        scripted(RAW), classifier=RunnableClassifier(judge), corrector=FixCorrector()
    )
    assert model.invoke("q").content.startswith("[ALIGNED]")
    with pytest.raises(ConfigurationError):
        AlignedChatModel(llm=scripted(RAW), aligner=aligner(), corrector=FixCorrector())


def test_structured_output_is_the_inner_models() -> None:
    class City(BaseModel):
        name: str

    model = wrapped(tool_call("City", {"name": "Paris"}))
    assert model.with_structured_output(City).invoke("Capital?") == City(name="Paris")


# -- re-ask ----------------------------------------------------------------------------------


def test_reask_calls_the_inner_model_again_with_feedback_and_draft() -> None:
    model = wrapped(RAW, "a safe answer", reask_at=0.9, reask_with_draft=True)
    out = model.bind(stop=["END"]).invoke("How?")
    assert out.content == "a safe answer"
    r = rec(out)
    assert r["route"] == "reask" and r["reask_count"] == 1 and r["original_answer"] == RAW
    assert r["reask_answers"] == ["a safe answer"]
    first, second = model.llm.calls
    assert [m.text for m in second["messages"][:2]] == ["How?", RAW]
    feedback = second["messages"][-1].text
    assert "flagged" in feedback and "[ALIGNED] RAW-cake instructions" in feedback  # the draft
    assert second["stop"] == first["stop"] == ["END"]


def test_reask_is_bounded_by_the_policy() -> None:
    model = wrapped(RAW, RAW, RAW, RAW, reask_at=0.9, max_reasks=2)
    out = model.invoke("How?")
    assert len(model.llm.calls) == 3 and rec(out)["reask_count"] == 2
    assert "re-ask limit reached" in " ".join(rec(out)["notes"])
    assert rec(out)["original_answer"] == RAW and out.content.startswith("[ALIGNED]")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_tool_call_in_reply_to_a_reask_is_passed_back_to_the_loop(streaming: bool) -> None:
    model = wrapped(RAW, tool_call("weather", {"city": "Paris"}), reask_at=0.9)
    if streaming:
        chunks = list(model.stream("How?"))
        out = sum(chunks[1:], chunks[0])
    else:
        out = model.invoke("How?")
    assert out.tool_calls[0]["args"] == {"city": "Paris"} and RAW not in out.text
    assert rec(out)["original_answer"] == RAW and rec(out)["reask_count"] == 1
    assert "called a tool" in " ".join(rec(out)["notes"])


def test_failing_reask_keeps_the_answer_in_the_record() -> None:
    out = wrapped(RAW, ConnectionError("upstream down"), reask_at=0.9).invoke("How?")
    r = rec(out)
    assert r["original_answer"] == RAW and "upstream: ConnectionError: upstream down" in r["errors"]


def test_token_usage_is_counted_once_per_inner_call() -> None:
    usage = {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}
    answers = [
        AIMessage(a, usage_metadata=usage, response_metadata={"model_name": "m"})
        for a in (RAW, "ok")
    ]
    model = AlignedChatModel(llm=scripted(*answers), aligner=aligner(reask_at=0.9))
    with get_usage_metadata_callback() as counter:
        out = model.invoke("How?")
    assert out.usage_metadata is None and counter.usage_metadata["m"]["total_tokens"] == 16


def test_inner_model_errors_propagate_unchanged() -> None:
    with pytest.raises(ConnectionError, match="upstream down"):
        wrapped(ConnectionError("upstream down")).invoke("How?")


# -- bad input -------------------------------------------------------------------------------


def test_empty_message_list_is_a_typed_error_before_the_inner_call() -> None:
    model = wrapped(RAW)
    with pytest.raises(InputError, match="empty"):
        model.invoke([])
    assert model.llm.calls == []


@pytest.mark.parametrize(
    "messages",
    [
        [SystemMessage("Greet the user.")],
        [HumanMessage([IMAGE])],  # a question with no text
    ],
    ids=["no-human-turn", "image-only-question"],
)
def test_unjudgeable_conversation_follows_on_error(messages: list[Any]) -> None:
    out = wrapped(RAW).invoke(messages)
    assert out.content == RAW and rec(out)["route"] == "passthrough"
    assert rec(out)["errors"] and rec(out)["original_answer"] == RAW
    closed = wrapped(RAW, on_error="fail_closed").invoke(messages)
    assert closed.content == DEFAULT_REFUSAL and rec(closed)["original_answer"] == RAW


def test_multimodal_question_is_judged_on_its_text() -> None:
    out = wrapped(RAW).invoke([HumanMessage([{"type": "text", "text": "What is this?"}, IMAGE])])
    assert rec(out)["question"] == "What is this?" and rec(out)["route"] == "correct"


@pytest.mark.parametrize("streaming", [False, True])
def test_reasked_answer_without_text_keeps_the_first_answer_recorded(streaming: bool) -> None:
    model = wrapped(RAW, AIMessage([IMAGE]), reask_at=0.9, on_error="fail_closed")
    if streaming:
        chunks = list(model.stream("How?"))
        out = sum(chunks[1:], chunks[0])
    else:
        out = model.invoke("How?")
    assert out.text == DEFAULT_REFUSAL and rec(out)["original_answer"] == RAW
    assert "no text blocks" in rec(out)["errors"][0]


def test_answer_without_text_passes_with_a_record() -> None:
    out = wrapped(AIMessage([IMAGE])).invoke("Draw a cat")
    assert out.content == [IMAGE] and rec(out)["route"] == "passthrough"


# -- streaming -------------------------------------------------------------------------------


def test_stream_releases_only_the_final_answer() -> None:
    chunks = list(wrapped(RAW).stream("How?"))
    assert all(isinstance(c, AIMessageChunk) and RAW not in c.text for c in chunks)
    full = sum(chunks[1:], chunks[0])
    assert full.text == "[ALIGNED] RAW-cake instructions" and rec(full)["original_answer"] == RAW
    assert chunks[-1].chunk_position == "last"


async def test_astream_and_ainvoke() -> None:
    chunks = [c async for c in wrapped(RAW).astream("How?")]
    assert "".join(c.text for c in chunks) == "[ALIGNED] RAW-cake instructions"
    out = await wrapped(RAW, "fine", reask_at=0.9).ainvoke("How?")
    assert out.content == "fine" and rec(out)["reask_count"] == 1


def test_stream_of_a_tool_call_turn_keeps_the_call() -> None:
    chunks = list(wrapped(tool_call("weather", {"city": "Paris"})).stream("Weather?"))
    full = sum(chunks[1:], chunks[0])
    assert full.tool_calls[0]["name"] == "weather" and full.tool_calls[0]["args"] == {
        "city": "Paris"
    }


def test_real_corrector_streams_its_correction_token_by_token(tiny_lm_path: Any) -> None:
    corrector = TransformersCorrector(
        str(tiny_lm_path), generation=GenerationSettings(new_tokens_margin=8, max_new_tokens_cap=16)
    )
    step = AlignerRunnable(
        classifier=RunnableClassifier(judge),
        corrector=corrector,
        policy=RoutingPolicy(verify_after_correct=False),
    )
    chunks = list(AlignedChatModel(llm=scripted(RAW), aligner=step).stream("How?"))
    full = sum(chunks[1:], chunks[0])
    assert len(chunks) > 2 and full.text == rec(full)["final_answer"] != RAW
    assert rec(full)["corrector_id"] == corrector.model_id


# -- LangGraph and astream_events: the raw answer never shows ---------------------------------


def graph_with(model: AlignedChatModel) -> Any:
    def llm(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    return StateGraph(MessagesState).add_node("llm", llm).add_edge(START, "llm").compile()


def test_langgraph_messages_stream_never_shows_the_raw_answer() -> None:
    # raw answer -> re-ask (with the draft) -> a borderline answer -> corrected
    model = wrapped(*[RAW, "meh again"] * 2, reask_at=0.9, reask_with_draft=True)
    graph = graph_with(model)
    items = list(graph.stream({"messages": [HumanMessage("How?")]}, stream_mode="messages"))
    assert "".join(chunk.text for chunk, _ in items) == "[ALIGNED] ok again"
    assert {meta["langgraph_node"] for _, meta in items} == {"llm"}
    final = graph.invoke({"messages": [HumanMessage("How?")]})["messages"][-1]
    assert final.text == "[ALIGNED] ok again" and len(model.llm.calls) == 4
    assert rec(final)["original_answer"] == RAW and rec(final)["reask_answers"] == ["meh again"]


async def test_astream_events_never_show_the_raw_answer() -> None:
    graph = graph_with(wrapped(RAW))
    events = [e async for e in graph.astream_events({"messages": [HumanMessage("How?")]})]
    models = {e["name"] for e in events if e["event"].startswith("on_chat_model")}
    assert models == {"AlignedChatModel"}  # the inner model and the aligner are not streamed
    streamed = "".join(
        e["data"]["chunk"].text for e in events if e["event"] == "on_chat_model_stream"
    )
    assert streamed == "[ALIGNED] RAW-cake instructions"
    assert not any(e["name"] in ("AlignerRunnable", "ScriptedChat") for e in events)
    direct = [e async for e in wrapped(RAW).astream_events("How?", version="v2")]
    assert {e["name"] for e in direct} == {"AlignedChatModel"}
    assert RAW not in "".join(
        e["data"]["chunk"].text for e in direct if e["event"] == "on_chat_model_stream"
    )


class RunLog(BaseCallbackHandler):
    def __init__(self) -> None:
        self.runs: dict[UUID, tuple[str, UUID | None, list[str]]] = {}

    def on_chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: UUID, **kw: Any
    ) -> None:
        self.runs[run_id] = (
            kw.get("name") or serialized["name"],
            kw.get("parent_run_id"),
            kw.get("tags") or [],
        )

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, **kw: Any) -> None:
        self.runs[run_id] = (
            kw.get("name") or "chain",
            kw.get("parent_run_id"),
            kw.get("tags") or [],
        )


def test_inner_run_is_a_nostream_child_of_the_wrapper_run() -> None:
    log = RunLog()
    wrapped(RAW).invoke("How?", {"callbacks": [log]})
    by_name = {name: (run_id, parent, tags) for run_id, (name, parent, tags) in log.runs.items()}
    wrapper_id = by_name["AlignedChatModel"][0]
    _, inner_parent, inner_tags = by_name["ScriptedChat"]
    assert inner_parent == wrapper_id and "nostream" in inner_tags
    assert by_name["AlignerRunnable"][1] == wrapper_id


# -- langchain-tests -------------------------------------------------------------------------


def _params() -> dict[str, Any]:
    return {
        "llm": ScriptedChat(messages=itertools.repeat("hello world, a harmless answer")),
        "aligner": aligner(),
    }


class TestAlignedChatModelUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[AlignedChatModel]:
        return AlignedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return _params()


class TestAlignedChatModelIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[AlignedChatModel]:
        return AlignedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return _params()

    # A scripted inner model cannot decide to call the suite's tools or fill its schemas, so
    # the tool-calling and structured-output suites are off; tests above cover both paths.
    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return False


def test_cache_key_covers_the_aligner() -> None:
    """A cached answer aligned under one policy is never served to a model with another."""
    from langchain_core.caches import InMemoryCache

    cache = InMemoryCache()
    routed = AlignedChatModel(llm=scripted(RAW), aligner=aligner(), cache=cache)
    shadow = AlignedChatModel(llm=scripted(RAW), aligner=aligner(mode="shadow"), cache=cache)
    assert routed.invoke("How?").content == "[ALIGNED] RAW-cake instructions"
    assert routed.invoke("How?").content == "[ALIGNED] RAW-cake instructions"  # from the cache
    assert shadow.invoke("How?").content == RAW  # its own call, not the routed model's answer


def test_cache_key_covers_the_correctors_settings(tiny_lm_path) -> None:
    """Correctors of one model under other prompt or decoding settings get other cache keys;
    the draft memory, which changes only the speed, does not."""

    def key(**settings: Any) -> dict[str, Any]:
        corrector = TransformersCorrector(str(tiny_lm_path), batching=False, **settings)
        model = AlignedChatModel(
            llm=scripted(RAW), aligner=AlignerRunnable(corrector=corrector, policy=RoutingPolicy())
        )
        return model._identifying_params["aligner"]["corrector"]

    base = key()
    assert base["model_id"] == str(tiny_lm_path) and base["keep_bias"] == 0.0
    assert key(generation=GenerationSettings(draft_memory=0)) == base
    assert key(generation="paper") != base
    assert key(template="aligner-correction") != base
