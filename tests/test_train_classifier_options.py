"""train-classifier's per-source training weights (--source-weight), without training a model."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from aligner_chain.classifiers.embedded import ASSET_DIR, CONFIG_FILE
from aligner_chain.cli import main
from aligner_chain.errors import ConfigurationError, InputError
from aligner_chain.training import train_classifier
from aligner_chain.training.classifier_data import SOURCES, build_mix
from aligner_chain.training.train_classifier import TrainSettings


def _captured_settings(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> TrainSettings:
    seen: list[TrainSettings] = []

    def fake_run(data_dir: Path, out: Path, settings: TrainSettings, base: str | None) -> dict:
        settings.check()
        seen.append(settings)
        return {"bands": {}, "metrics": {}}

    monkeypatch.setattr(train_classifier, "run", fake_run)
    assert main(["train-classifier", "--data-dir", "d", "--out", "o", *argv]) == 0
    return seen[0]


def test_source_weight_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    default = _captured_settings(monkeypatch, [])
    assert default.source_weights == TrainSettings().source_weights
    settings = _captured_settings(
        monkeypatch, ["--source-weight", "diasafety=4", "--source-weight", "safetext=0.5"]
    )
    assert settings.source_weights == {
        **TrainSettings().source_weights,
        "diasafety": 4.0,
        "safetext": 0.5,
    }


@pytest.mark.parametrize("value", ["diasafety", "diasafety=x", "=2", "diasafety=-1"])
def test_malformed_source_weight_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setattr(train_classifier, "run", pytest.fail)
    with pytest.raises(SystemExit) as exc:
        main(["train-classifier", "--data-dir", "d", "--out", "o", "--source-weight", value])
    assert exc.value.code == 2


@pytest.mark.parametrize("name", ["nonexistent", "safe_rlhf_mini", "safety_tuned_llamas"])
def test_only_training_sources_can_be_weighted(name: str) -> None:
    # the evaluation-only (non-commercial) sets must not reach training through a weight
    assert SOURCES.get(name) is None or SOURCES[name].use == "eval"
    with pytest.raises(ConfigurationError, match=name):
        TrainSettings(source_weights={name: 1.0}).check()


def test_build_mix_rejects_an_unknown_or_evaluation_only_weight(shared_data: Path) -> None:
    with pytest.raises(InputError, match="safe_rlhf_mini"):
        build_mix(
            shared_data,
            seed=0,
            max_train_per_source=2,
            max_eval_per_source=2,
            train_weights={"safe_rlhf_mini": 1.0},
        )


def test_a_weight_changes_only_that_sources_training_share(shared_data: Path) -> None:
    caps = {"seed": 0, "max_train_per_source": 5, "max_eval_per_source": 4}
    base = build_mix(shared_data, **caps)  # type: ignore[arg-type]
    weighted = build_mix(shared_data, **caps, train_weights={"diasafety": 4})  # type: ignore[arg-type]
    # the held-out samples do not move, so models trained with other weights compare like for like
    assert weighted.val == base.val
    assert weighted.test == base.test
    counts, weighted_counts = (Counter(ex.source for ex in m.train) for m in (base, weighted))
    assert counts["diasafety"] == round(5 * SOURCES["diasafety"].train_weight)
    assert weighted_counts["diasafety"] == 20
    assert {k: v for k, v in weighted_counts.items() if k != "diasafety"} == {
        k: v for k, v in counts.items() if k != "diasafety"
    }
    dia = {(ex.question, ex.answer) for ex in base.train if ex.source == "diasafety"}
    assert dia <= {(ex.question, ex.answer) for ex in weighted.train if ex.source == "diasafety"}


def test_the_command_defaults_are_the_shipped_recipe() -> None:
    # the model card's regenerate command relies on this: no flags beyond --data-dir and --out
    shipped = json.loads((ASSET_DIR / CONFIG_FILE).read_text())["settings"]
    assert asdict(TrainSettings()) == shipped
