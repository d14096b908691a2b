"""CascadeClassifier: the second stage sees exactly the in-band pairs, once per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from aligner_chain import AlignerRunnable, ConfigurationError, QAPair, RoutingPolicy, Verdict
from aligner_chain.classifiers import (
    CascadeClassifier,
    GuardModelClassifier,
    HarmClassifier,
    RunnableClassifier,
    SequenceClassifier,
)
from aligner_chain.errors import ClassifierError


class Recording(HarmClassifier):
    """A deterministic judge that remembers every batch it was given."""

    def __init__(self, score: Callable[[QAPair], float], classifier_id: str) -> None:
        self.score = score
        self.classifier_id = classifier_id
        self.batches: list[list[QAPair]] = []

    def classify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        self.batches.append(list(pairs))
        return [
            Verdict(score=self.score(p), classifier_id=self.classifier_id, details={"n": 1.0})
            for p in pairs
        ]


def first_score(pair: QAPair) -> float:
    """The answer spells its own first-stage score, e.g. ``"0.35"``."""
    return float(pair.answer)


PAIRS = [QAPair(f"q{i}", str(s)) for i, s in enumerate([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])]


def make(band: tuple[float, float]) -> tuple[CascadeClassifier, Recording, Recording]:
    first = Recording(first_score, "cheap")
    second = Recording(lambda p: 1.0 - float(p.answer), "strong")
    return CascadeClassifier(first, second, band=band), first, second


@pytest.mark.parametrize("use_async", [False, True])
async def test_second_stage_gets_exactly_the_band_in_one_batch(use_async: bool) -> None:
    cascade, first, second = make((0.3, 0.7))
    verdicts = await cascade.aclassify(PAIRS) if use_async else cascade.classify(PAIRS)
    assert [len(b) for b in first.batches] == [7]
    assert second.batches == [[PAIRS[2], PAIRS[3], PAIRS[4]]]  # 0.3 <= score <= 0.7, one call
    assert [v.stage for v in verdicts] == ["first"] * 2 + ["second"] * 3 + ["first"] * 2
    assert [v.classifier_id for v in verdicts] == ["cheap"] * 2 + ["strong"] * 3 + ["cheap"] * 2
    decided = verdicts[2]
    assert decided.score == pytest.approx(0.7)
    assert decided.details == {
        "n": 1.0,
        "first_score": 0.3,
        "second_score": pytest.approx(0.7),
        "first_classifier": "cheap",
    }
    assert verdicts[0].details == {"n": 1.0, "first_score": 0.0}


def test_no_second_call_when_nothing_is_in_band() -> None:
    cascade, _, second = make((0.55, 0.65))
    verdicts = cascade.classify(PAIRS)
    assert second.batches == []
    assert [v.score for v in verdicts] == [first_score(p) for p in PAIRS]
    assert cascade.classify([]) == [] and second.batches == []


def test_invoke_and_batch_as_a_runnable() -> None:
    cascade, _, second = make((0.0, 1.0))
    assert [v.stage for v in cascade.invoke([("q", "0.2"), ("q", "0.9")])] == ["second"] * 2
    out = cascade.batch([[("q", "0.2")], [("q", "0.95")]])
    assert [v[0].score for v in out] == [pytest.approx(0.8), pytest.approx(0.05)]
    assert [len(b) for b in second.batches] == [2, 1, 1]


def test_works_as_the_classifier_of_the_aligner_step() -> None:
    cascade, _, second = make((0.4, 0.6))
    step = AlignerRunnable(classifier=cascade, policy=RoutingPolicy(mode="shadow"))
    out = step.batch([{"question": "q", "answer": "0.5"}, {"question": "q", "answer": "0.9"}])
    records = [m.response_metadata["aligner"] for m in out]
    assert [r["verdict_before"]["stage"] for r in records] == ["second", "first"]
    assert [r["route"] for r in records] == ["correct", "correct"]
    assert records[0]["verdict_before"]["details"]["first_score"] == 0.5
    assert sum(len(b) for b in second.batches) == 1


def test_invalid_band_and_short_second_stage() -> None:
    first = RunnableClassifier(lambda q, a: 0.5)
    with pytest.raises(ConfigurationError):
        CascadeClassifier(first, first, band=(0.8, 0.2))
    with pytest.raises(ConfigurationError):
        CascadeClassifier(first, first, band=(-0.1, 0.2))
    short = Recording(lambda p: 0.5, "short")
    short.classify = lambda pairs: []  # type: ignore[method-assign]
    with pytest.raises(ClassifierError, match="0 verdicts for 1 pairs"):
        CascadeClassifier(first, short).classify([QAPair("q", "a")])


def test_tiny_models_escalate_exactly_the_band(tiny_seqcls_path, tiny_guard_path) -> None:
    cheap = SequenceClassifier(str(tiny_seqcls_path))
    guard = GuardModelClassifier(str(tiny_guard_path), generate_categories_at=None)
    pairs = [QAPair(f"Question {i}?", "word " * (i + 1)) for i in range(8)]
    scores = sorted(v.score for v in cheap.classify(pairs))
    band = (scores[2], scores[5])  # the middle four pairs by first-stage score
    calls: list[int] = []
    original = guard.classify
    guard.classify = lambda batch: calls.append(len(batch)) or original(batch)  # type: ignore[method-assign]
    verdicts = CascadeClassifier(cheap, guard, band=band).classify(pairs)
    assert calls == [4]
    escalated = [v for v in verdicts if v.stage == "second"]
    assert len(escalated) == 4
    for v in escalated:
        assert band[0] <= v.details["first_score"] <= band[1]
        assert v.score == v.details["second_score"] and v.classifier_id == str(tiny_guard_path)
