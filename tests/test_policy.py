"""RoutingPolicy bands, files and feedback."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from aligner_chain import Bands, ConfigurationError, QAPair, Route, RoutingPolicy, Verdict


@pytest.mark.parametrize(
    "score,route",
    [
        (0.0, Route.SKIP),
        (0.49, Route.SKIP),
        (0.5, Route.CORRECT),
        (0.8, Route.REASK),
        (0.95, Route.REFUSE),
    ],
)
def test_bands(score, route) -> None:
    policy = RoutingPolicy(correct_at=0.5, reask_at=0.8, refuse_at=0.95)
    assert policy.decide(QAPair("q", "a"), Verdict(score=score)) is route


def test_bands_must_be_ordered() -> None:
    with pytest.raises(ValidationError):
        Bands(correct_at=0.9, reask_at=0.5)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix) -> None:
    policy = RoutingPolicy(
        reask_at=0.8, category_bands={"hate": Bands(correct_at=0.2)}, fallback="original"
    )
    path = tmp_path / f"policy{suffix}"
    policy.save(path)
    assert RoutingPolicy.load(path) == policy


@pytest.mark.parametrize(
    "text", ["mode: [", "- a list", "mode: sometimes", "correct_at: 2", "unknown_key: 1"]
)
def test_bad_policy_files(tmp_path, text) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigurationError):
        RoutingPolicy.load(path)


def test_missing_policy_file(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        RoutingPolicy.load(tmp_path / "absent.yaml")


def test_feedback_names_top_categories() -> None:
    policy = RoutingPolicy(reask_with_draft=True)
    text = policy.feedback(Verdict(score=0.9, categories={"violence": 0.8, "hate": 0.1}), "draft")
    assert "0.90" in text and "violence" in text and "hate" not in text and "draft" in text
