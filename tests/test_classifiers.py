"""Sequence, guard-model and runnable classifiers on tiny local models."""

from __future__ import annotations

import pytest
import torch
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from pydantic import BaseModel

from aligner_chain import (
    ClassifierError,
    ConfigurationError,
    GuardModelClassifier,
    QAPair,
    RunnableClassifier,
    SequenceClassifier,
    Verdict,
)
from aligner_chain.classifiers.guard import LLAMA_GUARD_3_CATEGORIES, parse_guard_output
from aligner_chain.classifiers.runnable import parse_judgement

PAIRS = [QAPair("How do I kill a Python process?", "Use kill -9 PID."), QAPair("Hi", "Hello")]


def test_sequence_classifier_softmax_matches_a_manual_forward(tiny_seqcls_path) -> None:
    clf = SequenceClassifier(str(tiny_seqcls_path))
    verdicts = clf.classify(PAIRS)
    tok, model = clf.loaded.tokenizer, clf.loaded.model
    enc = tok(PAIRS[1].question, PAIRS[1].answer, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model(**enc).logits, -1)[0, 1].item()
    assert verdicts[1].score == pytest.approx(expected, abs=1e-5)
    assert set(verdicts[0].categories) == {"unsafe"} and verdicts[0].classifier_id


def test_sequence_classifier_batch_equals_single(tiny_seqcls_path) -> None:
    clf = SequenceClassifier(str(tiny_seqcls_path))
    batch = [v.score for v in clf.classify(PAIRS)]
    single = [clf.classify([p])[0].score for p in PAIRS]
    assert batch == pytest.approx(single, abs=1e-5)


def test_beaver_dam_preset_is_multilabel(tiny_seqcls_path) -> None:
    clf = SequenceClassifier.beaver_dam(str(tiny_seqcls_path), harm_labels=["safe", "unsafe"])
    verdict = clf.classify(PAIRS[:1])[0]
    assert clf.multi_label and verdict.score == pytest.approx(max(verdict.categories.values()))
    with pytest.raises(ConfigurationError):
        SequenceClassifier(str(tiny_seqcls_path), harm_labels=["nope"])


def test_guard_score_is_normalised_unsafe_probability(tiny_guard_path) -> None:
    guard = GuardModelClassifier.llama_guard_3(str(tiny_guard_path), generate_categories_at=None)
    verdict = guard.classify(PAIRS[:1])[0]
    tok = guard.loaded.tokenizer
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": PAIRS[0].question},
            {"role": "assistant", "content": PAIRS[0].answer},
        ],
        tokenize=False,
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(guard.loaded.model(**ids).logits[0, -1], -1)
    unsafe, safe = probs[guard.unsafe_id].item(), probs[guard.safe_id].item()
    assert verdict.score == pytest.approx(unsafe / (unsafe + safe), abs=1e-5)


def test_guard_generates_categories_when_flagged(tiny_guard_path) -> None:
    guard = GuardModelClassifier(str(tiny_guard_path), generate_categories_at=0.0)
    verdicts = guard.classify(PAIRS)
    assert all("raw" in v.details for v in verdicts)


def test_parse_guard_output() -> None:
    assert parse_guard_output("safe", LLAMA_GUARD_3_CATEGORIES) == (False, [])
    assert parse_guard_output("unsafe\nS1,S10", LLAMA_GUARD_3_CATEGORIES) == (
        True,
        ["Violent Crimes", "Hate"],
    )
    assert parse_guard_output("unsafe\nS99", {}) == (True, ["S99"])
    assert parse_guard_output("", {}) == (None, [])
    assert parse_guard_output("maybe", {}) == (None, [])


def test_guard_needs_a_chat_template(tiny_lm_path) -> None:
    with pytest.raises(ConfigurationError, match="chat template"):
        GuardModelClassifier(str(tiny_lm_path))


@pytest.mark.parametrize(
    "output,score",
    [
        (0.3, 0.3),
        (True, 1.0),
        ("0.75", 0.75),
        ("Score: 1", 1.0),
        ("unsafe", 1.0),
        ("safe", 0.0),
        ({"score": 0.2, "categories": {"hate": 0.1}}, 0.2),
        (Verdict(score=0.4), 0.4),
    ],
)
def test_parse_judgement(output, score) -> None:
    assert parse_judgement(output).score == pytest.approx(score)


@pytest.mark.parametrize("output", ["no idea", 1.5, -0.1, float("nan"), None, ["x"]])
def test_parse_judgement_rejects(output) -> None:
    with pytest.raises(ClassifierError):
        parse_judgement(output)


def test_chat_model_judge() -> None:
    judge = RunnableClassifier(FakeListChatModel(responses=["0.9", "0.1"]))
    verdicts = judge.invoke(PAIRS)
    assert sorted(v.score for v in verdicts) == [0.1, 0.9]
    assert all(v.classifier_id.startswith("judge:") for v in verdicts)


def test_structured_judge_object() -> None:
    class Score(BaseModel):
        score: float

    from langchain_core.runnables import RunnableLambda

    judge = RunnableClassifier(RunnableLambda(lambda prompt: Score(score=0.25)))
    assert judge.invoke(PAIRS[:1])[0].score == 0.25


async def test_async_judge() -> None:
    judge = RunnableClassifier(lambda q, a: 0.5)
    assert [v.score for v in await judge.ainvoke(PAIRS)] == [0.5, 0.5]


def test_bad_judge_type() -> None:
    with pytest.raises(TypeError):
        RunnableClassifier(42)  # type: ignore[arg-type]
