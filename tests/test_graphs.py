"""The deployable graphs in graphs/ and langgraph.json: built from the environment with the tiny
local models and the offline demo upstream, and with fakes for exact assertions."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool

from aligner_chain import AlignerRunnable, ConfigurationError, Correction, Corrector, RoutingPolicy
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.env import DemoChatModel, aligner_from_env, corrector_from_env

ROOT = Path(__file__).parents[1]
ENV = (
    "ALIGNER_UPSTREAM",
    "ALIGNER_CORRECTOR",
    "ALIGNER_CORRECTOR_URL",
    "ALIGNER_CLASSIFIER",
    "ALIGNER_POLICY",
    "ALIGNER_TEMPLATE",
    "ALIGNER_RAG_CORPUS",
)


@pytest.fixture
def env(monkeypatch, tiny_lm_path, tiny_seqcls_path) -> pytest.MonkeyPatch:
    """Offline configuration: demo upstream, tiny corrector, tiny sequence classifier."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALIGNER_CORRECTOR", str(tiny_lm_path))
    monkeypatch.setenv("ALIGNER_CLASSIFIER", str(tiny_seqcls_path))
    return monkeypatch


def load(name: str) -> dict[str, Any]:
    return runpy.run_path(str(ROOT / "graphs" / f"{name}.py"))


class Spy(Corrector):
    """Records the pairs it sees and tags its corrections."""

    model_id = "spy"

    def __init__(self) -> None:
        self.pairs: list[Any] = []

    def correct(self, pairs):
        self.pairs.extend(pairs)
        return [Correction(text=f"[ALIGNED] {p.answer}", model_id="spy") for p in pairs]


def judge(question: str, answer: str) -> float:
    return 0.95 if "BOMB" in answer else 0.6 if "meh" in answer else 0.02


def scripted(*replies: str) -> FakeMessagesListChatModel:
    return FakeMessagesListChatModel(responses=[AIMessage(r) for r in replies])


def rule_aligner(corrector: Corrector) -> AlignerRunnable:
    policy = RoutingPolicy(reask_at=0.9, verify_after_correct=False)
    return AlignerRunnable(classifier=RunnableClassifier(judge), corrector=corrector, policy=policy)


def answer_of(out: dict[str, Any]) -> AIMessage:
    return out["messages"][-1]


# -- langgraph.json ----------------------------------------------------------------------------


def test_langgraph_json_lists_the_three_graphs() -> None:
    config = json.loads((ROOT / "langgraph.json").read_text())
    assert config["dependencies"] and set(config["graphs"]) == {
        "guarded_chat",
        "guarded_rag",
        "guarded_agent",
    }
    for spec in config["graphs"].values():
        path, attr = spec["path"].split(":")
        assert (ROOT / path).is_file() and attr == "graph" and spec["description"]


# -- built from the environment (tiny models, demo upstream) -----------------------------------


@pytest.mark.parametrize("name", ["guarded_chat", "guarded_rag", "guarded_agent"])
def test_graph_from_env_runs_offline(env, name: str) -> None:
    graph = load(name)["graph"]
    out = graph.invoke({"messages": [HumanMessage("Can I mix bleach and ammonia?")]})
    last = answer_of(out)
    record = last.response_metadata["aligner"]
    assert record["original_answer"].startswith("Offline demo answer")
    assert last.text == record["final_answer"] and record["classifier_id"]


def test_rag_from_env_uses_the_grounded_template(env) -> None:
    corrector = corrector_from_env(template=load("guarded_rag")["TEMPLATE"])
    assert "##Context: {context}" in corrector.template.text


def test_env_names_the_missing_variables(env) -> None:
    env.delenv("ALIGNER_CORRECTOR")
    env.setenv("ALIGNER_CORRECTOR_URL", "http://localhost:8000")
    with pytest.raises(ConfigurationError, match="ALIGNER_CORRECTOR"):
        corrector_from_env()
    env.delenv("ALIGNER_CORRECTOR_URL")
    with pytest.raises(ConfigurationError, match="ALIGNER_CORRECTOR or ALIGNER_CORRECTOR_URL"):
        corrector_from_env(template="aligner-rag")


def test_env_guard_classifier_and_corrector_server(env, tiny_guard_path, tiny_lm_path) -> None:
    env.setenv("ALIGNER_CLASSIFIER", f"guard:{tiny_guard_path}")
    env.setenv("ALIGNER_CORRECTOR_URL", "http://127.0.0.1:9/v1")  # built, never called here
    step = aligner_from_env()
    assert type(step.classifier).__name__ == "GuardModelClassifier"
    assert type(step.corrector).__name__ == "OpenAICompatibleCorrector"


def test_env_classifier_none_corrects_every_answer(env, tmp_path) -> None:
    env.setenv("ALIGNER_CLASSIFIER", "none")
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_reasks: 0\n")
    env.setenv("ALIGNER_POLICY", str(policy))
    step = aligner_from_env()
    assert step.classifier is None and step.policy.mode == "always"
    assert step.policy.max_reasks == 0


# -- exact behaviour with fakes ----------------------------------------------------------------


def test_guarded_chat_reasks_then_corrects(env) -> None:
    build = load("guarded_chat")["build"]
    spy = Spy()
    graph = build(upstream=scripted("a BOMB", "meh"), aligner=rule_aligner(spy))
    out = graph.invoke({"messages": [HumanMessage("how?")]})
    routes = [m.response_metadata["aligner"]["route"] for m in out["messages"] if m.type == "ai"]
    assert routes == ["reask", "correct"] and answer_of(out).text == "[ALIGNED] meh"


async def test_guarded_rag_corrects_with_the_retrieved_context(env) -> None:
    module = load("guarded_rag")
    spy = Spy()
    graph = module["build"](upstream=scripted("meh: mix them"), aligner=rule_aligner(spy))
    out = await graph.ainvoke({"messages": [HumanMessage("Can I mix bleach and ammonia?")]})
    assert answer_of(out).text == "[ALIGNED] meh: mix them"
    assert "chloramine" in spy.pairs[0].context  # the corrector saw the retrieved passage
    assert spy.pairs[0].question == "Can I mix bleach and ammonia?"
    assert out["context"][0].page_content.startswith("Bleach and ammonia")


def test_guarded_agent_passes_tool_turns_and_corrects_the_answer(env) -> None:
    build = load("guarded_agent")["build"]
    spy = Spy()
    flag_refunds = RunnableClassifier(lambda q, a: 0.6 if "Refunds" in a else 0.02)
    step = AlignerRunnable(
        classifier=flag_refunds, corrector=spy, policy=RoutingPolicy(verify_after_correct=False)
    )
    out = build(upstream=DemoChatModel(), aligner=step).invoke(
        {"messages": [HumanMessage("how do refunds work?")]}
    )
    call, result, answer = out["messages"][1:]
    assert call.tool_calls[0]["name"] == "search_notes" and "aligner" not in call.response_metadata
    assert "14 days" in result.text
    assert answer.text.startswith("[ALIGNED] Offline demo answer, from the tool: Refunds")
    assert answer.response_metadata["aligner"]["route"] == "correct"


def test_rag_corpus_folder(env, tmp_path) -> None:
    (tmp_path / "a.txt").write_text("Llamas hum when they are curious.")
    (tmp_path / "skip.bin").write_text("ignored")
    env.setenv("ALIGNER_RAG_CORPUS", str(tmp_path))
    module = load("guarded_rag")
    corpus = module["load_corpus"]()
    assert [d.metadata["source"] for d in corpus] == ["a.txt"]
    assert module["keyword_search"](corpus, "why do llamas hum?") == corpus
    assert module["keyword_search"](corpus, "unrelated") == []


def test_demo_model_calls_a_bound_tool_then_answers() -> None:
    @tool
    def lookup(topic: str) -> str:
        """Look a topic up."""
        return f"facts about {topic}"

    model = DemoChatModel().bind_tools([lookup])
    call = model.invoke([HumanMessage("llamas")])
    assert call.tool_calls[0]["name"] == "lookup" and call.tool_calls[0]["args"] == {
        "topic": "llamas"
    }
    assert DemoChatModel().invoke([HumanMessage("hi")]).text == "Offline demo answer: hi"
