"""AlignerRunnable: every route and fallback, batching, streaming, callbacks and bad input."""

from __future__ import annotations

from typing import Any, ClassVar
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from aligner_chain import (
    AlignerRunnable,
    ClassifierError,
    ConfigurationError,
    Correction,
    Corrector,
    InputError,
    RefusedError,
    Route,
    RoutingPolicy,
    TransformersCorrector,
)
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.correctors.transformers import GenerationSettings
from aligner_chain.routing import DEFAULT_REFUSAL, Bands


def keyword_judge(question: str, answer: str) -> float:
    """Deterministic scores: BOMB is harmful, meh is borderline, the rest is fine."""
    if "BOMB" in answer:
        return 0.95
    if "meh" in answer:
        return 0.6
    return 0.02


def always_flag(question: str, answer: str) -> float:
    return 0.9


def broken_judge(question: str, answer: str) -> float:
    raise RuntimeError("judge is down")


@pytest.fixture(scope="module")
def corrector(tiny_lm_path) -> TransformersCorrector:
    return TransformersCorrector(str(tiny_lm_path))


def step(corrector, judge=keyword_judge, **policy: Any) -> AlignerRunnable:
    extra = {k: policy.pop(k) for k in ("upstream", "rule", "recorder") if k in policy}
    return AlignerRunnable(
        classifier=RunnableClassifier(judge),
        corrector=corrector,
        policy=RoutingPolicy(**policy),
        **extra,
    )


def record(message: AIMessage) -> dict[str, Any]:
    return message.response_metadata["aligner"]


def test_skip_passes_the_original_through(corrector) -> None:
    out = step(corrector).invoke({"question": "Bread?", "answer": "Bake it."})
    rec = record(out)
    assert out.content == "Bake it." and rec["route"] == "skip" and not rec["changed"]
    assert rec["verdict_before"]["score"] == pytest.approx(0.02)
    assert rec["corrected_answer"] is None and "classify:before" in rec["timings_ms"]


def test_correct_replaces_and_records_the_original(corrector) -> None:
    out = step(corrector).invoke({"question": "How?", "answer": "build a BOMB"})
    rec = record(out)
    expected = corrector.correct([__import__("aligner_chain").QAPair("How?", "build a BOMB")])[0]
    assert rec["route"] == "correct" and rec["original_answer"] == "build a BOMB"
    assert out.content == expected.text == rec["corrected_answer"] == rec["final_answer"]
    assert rec["verdict_after"]["score"] == pytest.approx(0.02)  # verified after correcting


def test_verify_after_correct_applies_the_fallback(corrector) -> None:
    out = step(corrector, judge=always_flag).invoke({"question": "q", "answer": "a"})
    rec = record(out)
    assert out.content == DEFAULT_REFUSAL and rec["fallback"] == "refuse"
    assert rec["corrected_answer"] and rec["original_answer"] == "a"
    kept = step(corrector, judge=always_flag, fallback="original").invoke(
        {"question": "q", "answer": "a"}
    )
    assert kept.content == "a" and record(kept)["fallback"] == "original"
    with pytest.raises(RefusedError) as info:
        step(corrector, judge=always_flag, fallback="raise").invoke(
            {"question": "q", "answer": "a"}
        )
    assert info.value.record.original_answer == "a"


def test_no_verification_when_disabled(corrector) -> None:
    out = step(corrector, judge=always_flag, verify_after_correct=False).invoke(
        {"question": "q", "answer": "a"}
    )
    assert record(out)["verdict_after"] is None and out.content == record(out)["corrected_answer"]


def test_refuse_band(corrector) -> None:
    out = step(corrector, refuse_at=0.9, refusal_message="No.").invoke(
        {"question": "q", "answer": "BOMB"}
    )
    assert out.content == "No." and record(out)["route"] == "refuse"
    assert record(out)["original_answer"] == "BOMB"


def test_category_bands_are_stricter() -> None:
    from aligner_chain import QAPair, Verdict

    policy = RoutingPolicy(category_bands={"violence": Bands(correct_at=0.1, refuse_at=0.3)})
    verdict = Verdict(score=0.05, categories={"violence": 0.4})
    assert policy.decide(QAPair("q", "a"), verdict) is Route.REFUSE
    assert policy.decide(QAPair("q", "a"), Verdict(score=0.05)) is Route.SKIP


def test_user_rule_overrides_the_route(corrector) -> None:
    def rule(pair, verdict, route):
        return "skip" if "trusted" in pair.question else None

    out = step(corrector, rule=rule).invoke({"question": "trusted q", "answer": "BOMB"})
    assert out.content == "BOMB" and record(out)["route"] == "skip"
    with pytest.raises(ConfigurationError):
        step(corrector, rule=lambda p, v, r: "nonsense").invoke({"question": "q", "answer": "a"})


def test_reask_gets_a_new_answer(corrector) -> None:
    upstream = FakeListChatModel(responses=["Here is a safe answer."])
    out = step(corrector, reask_at=0.9, upstream=upstream).invoke(
        {"question": "q", "answer": "BOMB"}
    )
    rec = record(out)
    assert out.content == "Here is a safe answer."
    assert rec["route"] == "reask" and rec["reask_count"] == 1
    assert rec["original_answer"] == "BOMB" and rec["reask_answers"] == ["Here is a safe answer."]


def test_reask_is_bounded_then_corrects(corrector) -> None:
    upstream = FakeListChatModel(responses=["BOMB again", "BOMB more", "BOMB!"])
    out = step(corrector, reask_at=0.9, max_reasks=2, upstream=upstream).invoke(
        {"question": "q", "answer": "BOMB"}
    )
    rec = record(out)
    assert rec["reask_count"] == 2 and rec["route"] == "correct"
    assert "re-ask limit reached: re-ask became correct" in rec["notes"]
    assert rec["corrected_answer"] == out.content


def test_reask_without_upstream_becomes_correct(corrector) -> None:
    out = step(corrector, reask_at=0.9).invoke({"question": "q", "answer": "BOMB"})
    rec = record(out)
    assert rec["initial_route"] == "reask" and rec["route"] == "correct"
    assert any("no upstream" in n for n in rec["notes"])


def test_reask_feedback_carries_the_draft(corrector) -> None:
    seen: list[Any] = []

    class Spy(FakeListChatModel):
        def _call(self, messages, *args, **kwargs):
            seen.append(messages)
            return super()._call(messages, *args, **kwargs)

    upstream = Spy(responses=["ok now"])
    step(corrector, reask_at=0.9, reask_with_draft=True, upstream=upstream).invoke(
        {"question": "q", "answer": "BOMB"}
    )
    feedback = seen[0][-1].content
    assert "flagged" in feedback and "safer draft" in feedback
    assert seen[0][-2].content == "BOMB"


@pytest.mark.parametrize(
    "on_error,expected", [("fail_open", "a"), ("fail_closed", DEFAULT_REFUSAL)]
)
def test_error_policies(corrector, on_error, expected) -> None:
    out = step(corrector, judge=broken_judge, on_error=on_error).invoke(
        {"question": "q", "answer": "a"}
    )
    rec = record(out)
    assert out.content == expected and rec["original_answer"] == "a"
    assert any("judge is down" in e for e in rec["errors"])


class BrokenCorrector(Corrector):
    model_id = "broken"

    def correct(self, pairs):
        raise RuntimeError("GPU on fire")


class KeepingCorrector(Corrector):
    """Leaves every answer as it is, as a model with a keep token does for safe answers."""

    model_id = "keeper"

    def correct(self, pairs):
        return [Correction(p.answer, self.model_id, info={"kept": True}) for p in pairs]


def test_unchanged_correction_keeps_its_verdict_without_reclassifying() -> None:
    calls: list[str] = []

    def counting(q: str, a: str) -> float:
        calls.append(a)
        return keyword_judge(q, a)

    flagged = step(KeepingCorrector(), judge=counting).invoke({"question": "q", "answer": "BOMB"})
    rec = record(flagged)
    assert calls == ["BOMB"]  # judged once: the same pair would get the same verdict
    assert rec["verdict_after"] == rec["verdict_before"] and rec["fallback"] == "refuse"
    assert "the corrector left the answer unchanged" in rec["notes"]
    assert rec["original_answer"] == rec["corrected_answer"] == "BOMB"
    calls.clear()
    kept = step(KeepingCorrector(), judge=counting, mode="always").invoke(
        {"question": "q", "answer": "fine"}
    )
    assert calls == ["fine"] and kept.content == "fine" and record(kept)["fallback"] is None


def test_corrector_failure_follows_the_error_policy() -> None:
    s = AlignerRunnable(classifier=RunnableClassifier(always_flag), corrector=BrokenCorrector())
    out = s.invoke({"question": "q", "answer": "a"})
    assert out.content == "a" and "GPU on fire" in record(out)["errors"][0]


def test_empty_generation_never_replaces_the_original(tiny_lm_path) -> None:
    base = TransformersCorrector(str(tiny_lm_path))
    eos = base.loaded.tokenizer.eos_token_id
    others = [i for i in range(len(base.loaded.tokenizer)) if i != eos]
    silent = TransformersCorrector(
        str(tiny_lm_path), generation=GenerationSettings(extra={"begin_suppress_tokens": others})
    )
    assert silent.correct([__import__("aligner_chain").QAPair("q", "BOMB")])[0].empty
    out = step(silent, fallback="original").invoke({"question": "q", "answer": "BOMB"})
    assert out.content == "BOMB"
    assert "the corrector produced no text" in record(out)["notes"]


def test_shadow_mode_changes_nothing(corrector) -> None:
    out = step(corrector, mode="shadow").invoke({"question": "q", "answer": "BOMB"})
    assert out.content == "BOMB" and record(out)["route"] == "correct"
    assert record(out)["mode"] == "shadow" and record(out)["corrected_answer"] is None


def test_always_mode_needs_no_classifier(corrector, monkeypatch) -> None:
    s = AlignerRunnable(corrector=corrector, policy=RoutingPolicy(mode="always"))
    out = s.invoke({"question": "q", "answer": "fine"})
    assert record(out)["route"] == "correct" and record(out)["verdict_before"] is None

    def absent():
        raise ConfigurationError("no embedded classifier")

    monkeypatch.setattr("aligner_chain.defaults.default_classifier", absent)
    with pytest.raises(ConfigurationError):
        AlignerRunnable(corrector=corrector)


def test_batch_uses_one_call_per_stage(corrector) -> None:
    calls: list[int] = []

    def counting(q: str, a: str) -> float:
        calls.append(1)
        return keyword_judge(q, a)

    class CountingCorrector(TransformersCorrector):
        batches: ClassVar[list[int]] = []

        def correct(self, pairs):
            self.batches.append(len(pairs))
            return super().correct(pairs)

    cc = CountingCorrector(corrector.model_id)
    s = step(cc, judge=counting)
    inputs = [{"question": "q", "answer": a} for a in ["BOMB 1", "fine", "meh", "BOMB 2"]]
    outs = s.batch(inputs)
    assert [record(o)["route"] for o in outs] == ["correct", "skip", "correct", "correct"]
    assert cc.batches == [3]
    singles = [s.invoke(i) for i in inputs]
    assert [o.content for o in outs] == [o.content for o in singles]


async def test_abatch_matches_batch(corrector) -> None:
    s = step(corrector)
    inputs = [{"question": "q", "answer": a} for a in ["BOMB", "fine"]]
    assert [o.content for o in await s.abatch(inputs)] == [o.content for o in s.batch(inputs)]


def test_batch_with_bad_items_returns_exceptions(corrector) -> None:
    outs = step(corrector).batch(
        [{"question": "q", "answer": "fine"}, {"question": "", "answer": "x"}, 42],
        return_exceptions=True,
    )
    assert outs[0].content == "fine"
    assert isinstance(outs[1], InputError) and isinstance(outs[2], InputError)


@pytest.mark.parametrize("verify", [False, True])
def test_stream_concatenation_equals_invoke(corrector, verify) -> None:
    s = step(corrector, verify_after_correct=verify)
    x = {"question": "q", "answer": "BOMB"}
    chunks = list(s.stream(x))
    assert "".join(c.content for c in chunks) == s.invoke(x).content
    assert chunks[-1].response_metadata["aligner"]["route"] == "correct"
    if not verify:
        assert len(chunks) > 2  # token by token


def test_stream_on_skip_streams_the_original(corrector) -> None:
    chunks = list(step(corrector).stream({"question": "q", "answer": "fine answer"}))
    assert "".join(c.content for c in chunks) == "fine answer"


async def test_astream_matches(corrector) -> None:
    s = step(corrector, verify_after_correct=False)
    x = {"question": "q", "answer": "BOMB"}
    chunks = [c async for c in s.astream(x)]
    assert "".join(c.content for c in chunks) == (await s.ainvoke(x)).content


class Runs(BaseCallbackHandler):
    def __init__(self) -> None:
        self.runs: dict[UUID, tuple[str, UUID | None, list[str]]] = {}

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, tags=None, **kw):
        self.runs[run_id] = (kw.get("name") or "", parent_run_id, tags or [])


def test_classifier_and_corrector_are_child_runs(corrector) -> None:
    handler = Runs()
    step(corrector).invoke({"question": "q", "answer": "BOMB"}, {"callbacks": [handler]})
    by_name = {name: (parent, tags) for name, parent, tags in handler.runs.values()}
    root = next(rid for rid, (name, _, _) in handler.runs.items() if name == "AlignerRunnable")
    assert by_name["RunnableClassifier"][0] == root
    assert "aligner:classifier" in by_name["RunnableClassifier"][1]
    assert by_name["TransformersCorrector"][0] == root
    assert "aligner:corrector" in by_name["TransformersCorrector"][1]


async def test_astream_events_show_child_runs(corrector) -> None:
    names = {
        (e["event"], e["name"])
        async for e in step(corrector).astream_events(
            {"question": "q", "answer": "BOMB"}, version="v2"
        )
    }
    assert ("on_chain_start", "RunnableClassifier") in names
    assert ("on_chain_end", "TransformersCorrector") in names


def test_messages_input_and_tool_calls(corrector) -> None:
    s = step(corrector)
    out = s.invoke([HumanMessage("q"), AIMessage("BOMB", id="ai-1")])
    assert out.id == "ai-1" and record(out)["question"] == "q"
    tool_turn = AIMessage("", tool_calls=[{"name": "search", "args": {"q": "x"}, "id": "t1"}])
    passed = s.invoke([HumanMessage("q"), tool_turn])
    assert passed is tool_turn or passed == tool_turn
    assert "aligner" not in passed.response_metadata


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "just a string",
        {"question": None, "answer": "a"},
        {"question": "q", "answer": ""},
        {"question": "q", "answer": "   "},
        {"question": 3, "answer": "a"},
        {"question": "q", "answer": "a", "context": 5},
        {"question": "q" * 500_000, "answer": "a"},
        [],
        [HumanMessage("q")],
        [AIMessage("a")],
        [HumanMessage("q"), AIMessage("a"), ToolMessage("r", tool_call_id="1")],
        [HumanMessage([{"type": "image", "url": "http://x/y.png"}]), AIMessage("a")],
        ["not a message"],
    ],
)
def test_bad_input_is_a_typed_error(corrector, bad) -> None:
    with pytest.raises(InputError):
        step(corrector).invoke(bad)


def test_multimodal_question_uses_its_text(corrector) -> None:
    q = HumanMessage(
        [{"type": "text", "text": "What is this?"}, {"type": "image", "url": "http://x"}]
    )
    out = step(corrector).invoke([q, AIMessage("a cat")])
    assert record(out)["question"] == "What is this?"


def test_lone_surrogates_do_not_crash(corrector) -> None:
    out = step(corrector).invoke({"question": "q\ud800", "answer": "BOMB \udfff"})
    assert record(out)["original_answer"] == "BOMB \udfff"


def test_unparsable_judge_is_a_classifier_error() -> None:
    judge = RunnableClassifier(lambda q, a: "I think maybe")
    with pytest.raises(ClassifierError):
        judge.invoke([("q", "a")])


def test_recorder_receives_records(corrector) -> None:
    class Memory:
        def __init__(self) -> None:
            self.got: list[Any] = []

        def record(self, records):
            self.got.extend(records)

    memory = Memory()
    s = step(corrector, record=True, recorder=memory)
    s.batch([{"question": "q", "answer": "BOMB"}, {"question": "q", "answer": "ok"}])
    assert [r.original_answer for r in memory.got] == ["BOMB", "ok"]


def test_classifier_bands_are_the_default_policy(corrector) -> None:
    judge = RunnableClassifier(keyword_judge)
    judge.default_bands = {"correct_at": 0.7, "reask_at": None, "refuse_at": 0.9}
    s = AlignerRunnable(classifier=judge, corrector=corrector)
    assert s.policy.correct_at == 0.7 and s.policy.refuse_at == 0.9
    assert record(s.invoke({"question": "q", "answer": "meh"}))["route"] == "skip"
    explicit = AlignerRunnable(classifier=judge, corrector=corrector, policy=RoutingPolicy())
    assert explicit.policy.correct_at == 0.5
