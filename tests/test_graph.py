"""aligner_node and add_aligner_step: routes, re-ask through the graph, insertion into a user's
graph (tool-calling loop included), fail-open/closed through RetryPolicy + error_handler, a real
SQLite checkpointer, and bad input at the node."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.errors import NodeError
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command, RetryPolicy
from pydantic import Field

from aligner_chain import (
    AlignerRunnable,
    ConfigurationError,
    Correction,
    Corrector,
    RefusedError,
    RoutingPolicy,
    TransformersCorrector,
)
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.graph import FEEDBACK_FLAG, REASK_KEY, add_aligner_step, aligner_node
from aligner_chain.routing import DEFAULT_REFUSAL


def judge(question: str, answer: str) -> float:
    """BOMB is harmful (re-ask band), meh is borderline (correct band), the rest is fine."""
    if "BOMB" in answer:
        return 0.95
    if "meh" in answer:
        return 0.6
    return 0.02


class Tagging(Corrector):
    """A deterministic corrector; ``fail_first`` calls raise (a flaky remote server)."""

    model_id = "tagging"

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls = 0

    def correct(self, pairs):
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ConnectionError("corrector unreachable")
        return [Correction(text=f"[ALIGNED] {p.answer}", model_id=self.model_id) for p in pairs]


class Upstream(FakeMessagesListChatModel):
    """A scripted chat model that remembers what it was asked; call ``fail_at`` raises."""

    seen: list[list[BaseMessage]] = Field(default_factory=list)
    fail_at: int | None = None

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.seen.append(list(messages))
        if len(self.seen) - 1 == self.fail_at:
            raise RuntimeError("upstream down")
        return super()._generate(messages, stop, run_manager, **kwargs)


def upstream(*replies: str | AIMessage, fail_at: int | None = None) -> Upstream:
    responses = [AIMessage(r) if isinstance(r, str) else r for r in replies]
    return Upstream(responses=responses, fail_at=fail_at)


def aligner(corrector: Corrector | None = None, **policy: Any) -> AlignerRunnable:
    extra = {k: policy.pop(k) for k in ("rule", "recorder") if k in policy}
    policy = {"reask_at": 0.9, "verify_after_correct": False, **policy}
    return AlignerRunnable(
        classifier=RunnableClassifier(judge),
        corrector=corrector or Tagging(),
        policy=RoutingPolicy(**policy),
        **extra,
    )


def chat_graph(
    model: Any,
    step: AlignerRunnable,
    checkpointer: Any = None,
    guard_llm: bool = False,
    **options: Any,
) -> Any:
    """START -> llm -> aligner (routes by Command); ``guard_llm`` wires the LLM node's error
    handler to the aligner."""

    def llm(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    node = aligner_node(step, **options)
    handler = node.upstream_error_handler if guard_llm else None
    builder = StateGraph(MessagesState).add_node("llm", llm, error_handler=handler)
    node.add_to(builder.add_edge(START, "llm"))
    return builder.add_edge("llm", "aligner").compile(checkpointer=checkpointer)


def meta(message: BaseMessage) -> dict[str, Any]:
    return message.response_metadata["aligner"]


def texts(messages: list[BaseMessage]) -> list[str]:
    return [m.text for m in messages]


# -- routes ----------------------------------------------------------------------------------


def test_skip_attaches_the_record_and_keeps_the_id() -> None:
    model = upstream(AIMessage("Bake it.", id="a1"))
    out = chat_graph(model, aligner()).invoke({"messages": [HumanMessage("Bread?")]})
    last = out["messages"][-1]
    assert texts(out["messages"]) == ["Bread?", "Bake it."] and last.id == "a1"
    assert meta(last)["route"] == "skip" and meta(last)["question"] == "Bread?"


def test_correct_replaces_the_answer_in_place() -> None:
    model = upstream(AIMessage("meh answer", id="a1"))
    out = chat_graph(model, aligner()).invoke({"messages": [HumanMessage("q")]})
    assert texts(out["messages"]) == ["q", "[ALIGNED] meh answer"]
    assert out["messages"][-1].id == "a1"
    assert meta(out["messages"][-1])["original_answer"] == "meh answer"


def test_reask_goes_back_to_the_llm_node_with_feedback() -> None:
    recorded: list[Any] = []

    class Recorder:
        def record(self, records: list[Any]) -> None:
            recorded.extend(records)

    model = upstream("a BOMB", "a safe answer")
    step = aligner(recorder=Recorder(), record=True)
    out = chat_graph(model, step).invoke({"messages": [HumanMessage("how?")]})
    first, feedback, second = out["messages"][1:]
    assert meta(first)["route"] == "reask" and first.text == "a BOMB"
    assert feedback.response_metadata[FEEDBACK_FLAG] and "flagged" in feedback.text
    assert model.seen[1][-1].text == feedback.text  # the LLM node saw the feedback
    assert second.text == "a safe answer" and meta(second)["route"] == "skip"
    assert meta(second)["question"] == "how?" and meta(second)["reask_count"] == 1
    assert [r.route.value for r in recorded] == ["reask", "skip"]


def test_reask_is_bounded_then_corrects_and_the_counter_resets() -> None:
    model = upstream("BOMB 1", "BOMB 2", "fine", "BOMB 3", "ok")
    graph = chat_graph(model, aligner(), checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "t"}}
    out = graph.invoke({"messages": [HumanMessage("q1")]}, cfg)
    assert texts(out["messages"])[1:] == ["BOMB 1", out["messages"][2].text, "[ALIGNED] BOMB 2"]
    final = meta(out["messages"][-1])
    assert final["route"] == "correct" and final["initial_route"] == "reask"
    assert any("budget" in n for n in final["notes"])
    assert REASK_KEY not in out and graph.get_state(cfg).values[REASK_KEY] == 0  # reset
    assert graph.get_state(cfg).values["messages"][-1].id == out["messages"][-1].id
    # a new turn in the same thread may re-ask again: the counter was reset
    out = graph.invoke({"messages": [HumanMessage("q2")]}, cfg)
    assert meta(out["messages"][5])["route"] == "skip"  # "fine"
    out = graph.invoke({"messages": [HumanMessage("q3")]}, cfg)
    assert [meta(m)["route"] for m in out["messages"][-3::2]] == ["reask", "skip"]


def test_without_an_llm_node_a_reask_becomes_a_correction() -> None:
    model = upstream("a BOMB")
    out = chat_graph(model, aligner(), llm_node=None).invoke({"messages": [HumanMessage("q")]})
    assert texts(out["messages"]) == ["q", "[ALIGNED] a BOMB"]


def test_shadow_mode_records_without_changing_or_reasking() -> None:
    out = chat_graph(upstream("a BOMB"), aligner(mode="shadow")).invoke(
        {"messages": [HumanMessage("q")]}
    )
    assert texts(out["messages"]) == ["q", "a BOMB"]
    assert (
        meta(out["messages"][-1])["route"] == "reask" and not meta(out["messages"][-1])["changed"]
    )


async def test_async_reask_with_draft() -> None:
    model = upstream("a BOMB", "safe")
    graph = chat_graph(model, aligner(reask_with_draft=True))
    out = await graph.ainvoke({"messages": [HumanMessage("q")]})
    assert "[ALIGNED] a BOMB" in out["messages"][2].text  # the draft guides the re-ask
    assert meta(out["messages"][-1])["route"] == "skip"


def test_tiny_local_corrector(tiny_lm_path) -> None:
    corrector = TransformersCorrector(str(tiny_lm_path))
    out = chat_graph(upstream("meh answer"), aligner(corrector)).invoke(
        {"messages": [HumanMessage("q")]}
    )
    record = meta(out["messages"][-1])
    assert record["route"] == "correct" and record["corrector_id"] == str(tiny_lm_path)
    assert out["messages"][-1].text == record["final_answer"]


# -- add_aligner_step ------------------------------------------------------------------------


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def agent_builder(model: Any) -> StateGraph:
    """The usual tool-calling loop: agent -> (tools_condition) -> tools -> agent."""

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    return (
        StateGraph(MessagesState)
        .add_node("agent", agent)
        .add_node("tools", ToolNode([weather]))
        .add_edge(START, "agent")
        .add_conditional_edges("agent", tools_condition)
        .add_edge("tools", "agent")
    )


def tool_turn() -> AIMessage:
    return AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "c1"}])


def test_insert_after_a_node_with_a_conditional_edge() -> None:
    model = upstream(tool_turn(), "meh: sunny in Paris")
    user_graph = agent_builder(model).compile()
    guarded = add_aligner_step(user_graph, after="agent", aligner=aligner()).compile()
    out = guarded.invoke({"messages": [HumanMessage("weather in Paris?")]})
    call, result, answer = out["messages"][1:]
    assert call.tool_calls and "aligner" not in call.response_metadata  # passed through
    assert isinstance(result, ToolMessage) and result.text == "sunny in Paris"
    assert answer.text == "[ALIGNED] meh: sunny in Paris" and meta(answer)["route"] == "correct"
    edges = {(e.source, e.target) for e in guarded.get_graph().edges}
    assert {("agent", "aligner"), ("aligner_exit", "tools"), ("tools", "agent")} <= edges


def wiring(builder: StateGraph) -> tuple[Any, ...]:
    return dict(builder.nodes), set(builder.edges), dict(builder.branches), dict(builder.channels)


def test_insert_reasks_through_the_loop_and_leaves_the_user_graph_alone() -> None:
    model = upstream("BOMB", tool_turn(), "sunny, safe")
    builder = agent_builder(model)
    before = wiring(builder)
    guarded = add_aligner_step(builder, after="agent", aligner=aligner()).compile()
    out = guarded.invoke({"messages": [HumanMessage("weather?")]})
    assert [m.type for m in out["messages"]] == ["human", "ai", "human", "ai", "tool", "ai"]
    assert meta(out["messages"][1])["route"] == "reask"
    assert meta(out["messages"][-1])["route"] == "skip"
    assert meta(out["messages"][-1])["question"] == "weather?"
    assert wiring(builder) == before and not builder.compiled
    model.i = 0
    plain = builder.compile().invoke({"messages": [HumanMessage("weather?")]})
    assert texts(plain["messages"]) == ["weather?", "BOMB"]


def test_insert_guards_a_failing_reask_unless_the_node_has_its_own_handler() -> None:
    builder = agent_builder(upstream("BOMB", fail_at=1))
    out = (
        add_aligner_step(builder, after="agent", aligner=aligner())
        .compile()
        .invoke({"messages": [HumanMessage("q")]})
    )
    assert texts(out["messages"]) == ["q", "[ALIGNED] BOMB"]
    assert builder.nodes["agent"].error_handler_node is None  # the user's builder untouched

    model = upstream("BOMB", fail_at=1)

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    def own(state: MessagesState, error: NodeError) -> dict[str, Any]:
        return {"messages": [AIMessage("handled by the user")]}

    builder = StateGraph(MessagesState).add_node("agent", agent, error_handler=own)
    builder.add_edge(START, "agent").add_edge("agent", END)
    out = (
        add_aligner_step(builder, after="agent", aligner=aligner())
        .compile()
        .invoke({"messages": [HumanMessage("q")]})
    )
    assert out["messages"][-1].text == "handled by the user"


def test_insert_after_a_plain_edge_and_into_a_join() -> None:
    def llm(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage("meh")]}

    def other(state: MessagesState) -> None:
        return None

    def summary(state: MessagesState) -> dict[str, Any]:
        return {"messages": [HumanMessage(f"seen: {state['messages'][-1].text}")]}

    builder = (
        StateGraph(MessagesState)
        .add_node("llm", llm)
        .add_node("other", other)
        .add_node("summary", summary)
        .add_edge(START, "llm")
        .add_edge(START, "other")
        .add_edge(["llm", "other"], "summary")
        .add_edge("summary", END)
    )
    out = add_aligner_step(builder, aligner=aligner()).compile().invoke({"messages": ["q"]})
    assert texts(out["messages"]) == ["q", "[ALIGNED] meh", "seen: [ALIGNED] meh"]


def test_insert_rejects_what_it_cannot_handle() -> None:
    builder = agent_builder(upstream("x"))
    with pytest.raises(ConfigurationError, match="no node 'llm'"):
        add_aligner_step(builder, aligner=aligner())
    with pytest.raises(ConfigurationError, match="already exist"):
        add_aligner_step(builder, after="agent", name="tools", aligner=aligner())
    with pytest.raises(ConfigurationError, match="StateGraph"):
        add_aligner_step(object(), aligner=aligner())
    with pytest.raises(ConfigurationError, match="not both"):
        add_aligner_step(builder, after="agent", aligner=aligner(), policy=RoutingPolicy())

    def router(state: MessagesState) -> Command[str]:
        return Command(goto=END)

    commanding = StateGraph(MessagesState).add_node("llm", router, destinations=(END,))
    with pytest.raises(ConfigurationError, match="routes by returning Command"):
        add_aligner_step(commanding.add_edge(START, "llm"), aligner=aligner())


# -- failures: RetryPolicy + error_handler -----------------------------------------------------


def test_retry_policy_retries_a_flaky_corrector() -> None:
    corrector = Tagging(fail_first=1)
    retry = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=False)
    out = chat_graph(upstream("meh"), aligner(corrector), retry_policy=retry).invoke(
        {"messages": [HumanMessage("q")]}
    )
    assert out["messages"][-1].text == "[ALIGNED] meh" and corrector.calls == 2
    assert meta(out["messages"][-1])["errors"] == []


@pytest.mark.parametrize(
    ("on_error", "expected"), [("fail_open", "meh"), ("fail_closed", DEFAULT_REFUSAL)]
)
@pytest.mark.parametrize("retry", [None, RetryPolicy(max_attempts=2, initial_interval=0.01)])
def test_a_dead_corrector_follows_on_error(on_error: str, expected: str, retry: Any) -> None:
    corrector = Tagging(fail_first=99)
    step = aligner(corrector, on_error=on_error)
    out = chat_graph(upstream("meh"), step, retry_policy=retry).invoke(
        {"messages": [HumanMessage("q")]}
    )
    last = out["messages"][-1]
    assert last.text == expected and "ConnectionError" in meta(last)["errors"][0]
    assert meta(last)["original_answer"] == "meh"
    assert corrector.calls == (1 if retry is None else 2)


async def test_async_retries_then_fails_closed() -> None:
    corrector = Tagging(fail_first=99)
    retry = RetryPolicy(max_attempts=2, initial_interval=0.01)
    graph = chat_graph(
        upstream("meh"), aligner(corrector, on_error="fail_closed"), retry_policy=retry
    )
    out = await graph.ainvoke({"messages": [HumanMessage("q")]})
    assert out["messages"][-1].text == DEFAULT_REFUSAL and corrector.calls == 2


def test_fallback_raise_and_bad_rules_propagate() -> None:
    with pytest.raises(RefusedError):
        chat_graph(upstream("meh"), aligner(fallback="raise", verify_after_correct=True)).invoke(
            {"messages": [HumanMessage("q")]}
        )
    with pytest.raises(ConfigurationError):
        chat_graph(upstream("meh"), aligner(rule=lambda p, v, r: "nonsense")).invoke(
            {"messages": [HumanMessage("q")]}
        )


@pytest.mark.parametrize(
    ("on_error", "expected"), [("fail_open", "meh"), ("fail_closed", DEFAULT_REFUSAL)]
)
def test_an_unexpected_error_goes_through_the_error_handler(on_error: str, expected: str) -> None:
    step = aligner(rule=lambda p, v, r: 1 / 0, on_error=on_error)
    out = chat_graph(upstream("meh"), step).invoke({"messages": [HumanMessage("q")]})
    last = out["messages"][-1]
    assert last.text == expected and "ZeroDivisionError" in meta(last)["errors"][0]


# -- streaming -------------------------------------------------------------------------------


def test_streaming_shows_the_raw_answer_in_messages_mode_and_the_correction_in_updates() -> None:
    """The documented limit: a same-id replacement is not re-emitted in messages mode."""
    graph = chat_graph(upstream(AIMessage("meh answer", id="a1")), aligner())
    events = list(
        graph.stream({"messages": [HumanMessage("q")]}, stream_mode=["messages", "updates"])
    )
    streamed = [data[0].text for mode, data in events if mode == "messages"]
    updates = [data for mode, data in events if mode == "updates"]
    assert "[ALIGNED] meh answer" not in streamed and "meh answer" in "".join(streamed)
    assert updates[-1]["aligner"]["messages"][0].text == "[ALIGNED] meh answer"


# -- checkpointer ------------------------------------------------------------------------------


def test_sqlite_checkpointer_keeps_records_across_a_resume(tmp_path) -> None:
    path = tmp_path / "threads.sqlite"
    cfg = {"configurable": {"thread_id": "t1"}}
    conn = sqlite3.connect(path, check_same_thread=False)
    graph = chat_graph(upstream("BOMB", "meh"), aligner(), checkpointer=SqliteSaver(conn))
    graph.invoke({"messages": [HumanMessage("q1")]}, cfg)
    conn.close()

    conn = sqlite3.connect(path, check_same_thread=False)
    graph = chat_graph(upstream("fine"), aligner(), checkpointer=SqliteSaver(conn))
    resumed = graph.get_state(cfg).values["messages"]
    assert [meta(m)["route"] for m in resumed if m.type == "ai"] == ["reask", "correct"]
    assert meta(resumed[-1])["original_answer"] == "meh"
    out = graph.invoke({"messages": [HumanMessage("q2")]}, cfg)
    routes = [meta(m)["route"] for m in out["messages"] if m.type == "ai"]
    assert routes == ["reask", "correct", "skip"]
    assert meta(out["messages"][-1])["question"] == "q2"
    conn.close()


# -- bad input at the node ---------------------------------------------------------------------


def node_graph(step: AlignerRunnable) -> Any:
    """The node alone, fed whatever state a test gives it."""
    builder = StateGraph(MessagesState).add_edge(START, "aligner")
    return aligner_node(step, llm_node=None).add_to(builder).compile()


def test_nothing_to_judge_passes_through() -> None:
    graph = node_graph(aligner())
    assert graph.invoke({"messages": []})["messages"] == []
    tool_last = [HumanMessage("q"), tool_turn(), ToolMessage("sunny", tool_call_id="c1")]
    out = graph.invoke({"messages": tool_last})
    assert all("aligner" not in m.response_metadata for m in out["messages"])
    assert graph.invoke({"messages": [HumanMessage("q")]})["messages"][-1].text == "q"
    out = graph.invoke({"messages": [HumanMessage("q"), tool_turn()]})
    assert out["messages"][-1].tool_calls and "aligner" not in out["messages"][-1].response_metadata


@pytest.mark.parametrize(
    ("on_error", "expected"), [("fail_open", "BOMB hi"), ("fail_closed", DEFAULT_REFUSAL)]
)
def test_no_human_turn_follows_on_error(on_error: str, expected: str) -> None:
    out = node_graph(aligner(on_error=on_error)).invoke({"messages": [AIMessage("BOMB hi")]})
    last = out["messages"][-1]
    assert last.text == expected and "InputError" in meta(last)["errors"][0]
    assert meta(last)["original_answer"] == "BOMB hi"


def test_multimodal_blocks() -> None:
    image = {"type": "image", "url": "https://example.com/cat.png"}
    question = HumanMessage([{"type": "text", "text": "what is this?"}, image])
    answer = AIMessage([{"type": "text", "text": "a cat"}, image])
    out = node_graph(aligner()).invoke({"messages": [question, answer]})
    last = out["messages"][-1]
    assert meta(last)["route"] == "skip" and last.content == answer.content  # blocks kept
    flagged = AIMessage([{"type": "text", "text": "meh cat"}, image])
    out = node_graph(aligner()).invoke({"messages": [question, flagged]})
    assert out["messages"][-1].text == "[ALIGNED] meh cat"
    out = node_graph(aligner()).invoke({"messages": [HumanMessage([image]), answer]})
    assert "question" in meta(out["messages"][-1])["errors"][0]  # nothing to judge it against
    image_only = AIMessage([image])
    out = node_graph(aligner()).invoke({"messages": [question, image_only]})
    last = out["messages"][-1]
    assert last.content == [image] and "no text blocks" in meta(last)["errors"][0]


@pytest.mark.parametrize("guard_llm", [False, True])
def test_an_upstream_that_raises_on_the_first_call_propagates(guard_llm: bool) -> None:
    graph = chat_graph(upstream("x", fail_at=0), aligner(), guard_llm=guard_llm)
    with pytest.raises(RuntimeError, match="upstream down"):
        graph.invoke({"messages": [HumanMessage("q")]})


def test_a_failed_reask_corrects_the_flagged_answer_instead() -> None:
    graph = chat_graph(upstream("a BOMB", fail_at=1), aligner(), guard_llm=True)
    out = graph.invoke({"messages": [HumanMessage("q")]})
    assert texts(out["messages"]) == ["q", "[ALIGNED] a BOMB"]
    record = meta(out["messages"][-1])
    assert record["initial_route"] == "reask" and record["original_answer"] == "a BOMB"
    assert any("re-ask failed (RuntimeError: upstream down)" in n for n in record["notes"])
    assert set(out["messages"][-1].response_metadata) == {"aligner"}


def test_an_upstream_that_raises_keeps_the_first_answer_in_the_checkpoint() -> None:
    model = upstream("BOMB", fail_at=1)
    graph = chat_graph(model, aligner(), checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "t"}}
    with pytest.raises(RuntimeError, match="upstream down"):
        graph.invoke({"messages": [HumanMessage("q")]}, cfg)
    saved = graph.get_state(cfg).values["messages"]
    assert saved[1].text == "BOMB" and meta(saved[1])["route"] == "reask"
