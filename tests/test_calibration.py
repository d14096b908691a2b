"""Calibration: known thresholds and bands come back from synthetic data; policies round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aligner_chain import CascadeClassifier, QAPair, Route, RoutingPolicy, Verdict
from aligner_chain.calibration import (
    Estimate,
    Target,
    calibrate,
    expected_calibration_error,
    fit_map,
    fit_operating_point,
    precision_threshold,
    read_labelled,
)
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.cli import main
from aligner_chain.errors import InputError
from aligner_chain.routing import Calibration, ScoreMap

RNG_SEED = 7


def overlapping(n: int, seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Safe scores ~ U(0, 0.6), harmful ~ U(0.4, 1): FPR(t) = (0.6 - t) / 0.6 and
    recall(t) = (1 - t) / 0.6 on [0.4, 0.6]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.where(y == 1, rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.6, n))


def perfect_second(y: np.ndarray, seed: int = RNG_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    return np.where(y == 1, rng.uniform(0.5, 1.0, len(y)), rng.uniform(0.0, 0.5, len(y)))


@pytest.mark.parametrize(
    ("target", "expected"), [(Target("fpr", 0.05), 0.57), (Target("recall", 0.9), 0.46)]
)
def test_single_stage_threshold_is_recovered(target: Target, expected: float) -> None:
    y, s = overlapping(8000)
    threshold, band = fit_operating_point(y, s, target)
    assert threshold == pytest.approx(expected, abs=0.01) and band is None


def test_conservative_targets_hold_the_wilson_bound() -> None:
    y, s = overlapping(2000)
    negatives = int((y == 0).sum())
    plain, _ = fit_operating_point(y, s, Target("fpr", 0.05))
    strict, _ = fit_operating_point(y, s, Target("fpr", 0.05), conservative=True)
    assert strict > plain
    fp = int(((s >= strict) & (y == 0)).sum())
    assert Estimate.of(fp, negatives).high <= 0.05 < Estimate.of(fp, negatives).value + 0.02
    low_recall, _ = fit_operating_point(y, s, Target("recall", 0.9), conservative=True)
    assert low_recall < fit_operating_point(y, s, Target("recall", 0.9))[0]


def test_separable_scores_give_the_exact_boundary() -> None:
    s = np.array([0.05, 0.1, 0.2, 0.29, 0.31, 0.5, 0.9])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    assert fit_operating_point(y, s, Target("fpr", 0.0))[0] == 0.31
    assert fit_operating_point(y, s, Target("recall", 1.0))[0] == 0.31
    # unreachable: the top score is safe, so nothing can be flagged at FPR 0
    assert fit_operating_point(1 - y, s, Target("fpr", 0.0))[0] > 0.9


def test_cascade_band_is_the_uncertain_region() -> None:
    y, s1 = overlapping(6000)
    s2 = perfect_second(y)
    threshold, band = fit_operating_point(
        y, s1, Target("fpr", 0.0), raw_first=s1, second=s2, budget=0.4
    )
    assert band is not None
    assert band[0] == pytest.approx(0.4, abs=0.01) and band[1] == pytest.approx(0.6, abs=0.01)
    assert threshold == pytest.approx(0.5, abs=0.01)


def test_cascade_respects_the_budget_and_beats_the_first_stage() -> None:
    y, s1 = overlapping(4000)
    result = calibrate(y, s1, second=perfect_second(y), target=Target("fpr", 0.02), budget=0.1)
    report = result.report
    assert report["escalated"].value <= 0.1
    assert report["fpr"].value <= 0.02
    assert report["recall"].value > report["alone"]["first"]["recall"].value + 0.05
    low, high = report["cascade_band"]
    assert result.policy.calibration.cascade_band == (low, high)


def test_platt_recovers_known_parameters_and_isotonic_matches_sklearn() -> None:
    rng = np.random.default_rng(RNG_SEED)
    z = rng.normal(0.0, 2.0, 20000)
    s = 1.0 / (1.0 + np.exp(-z))
    y = (rng.uniform(size=len(z)) < 1.0 / (1.0 + np.exp(-(2.0 * z - 1.0)))).astype(int)
    platt = fit_map(s, y, "platt")
    assert platt.a == pytest.approx(2.0, abs=0.15) and platt.b == pytest.approx(-1.0, abs=0.15)
    iso = fit_map(s, y, "isotonic")
    from sklearn.isotonic import IsotonicRegression

    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s, y)
    probe = np.concatenate([rng.uniform(size=200), [0.0, 1.0]])
    assert [iso(float(p)) for p in probe] == pytest.approx(reference.predict(probe).tolist())
    mapped = np.array([iso(float(v)) for v in s])
    assert expected_calibration_error(mapped, y) < expected_calibration_error(s, y) / 3


def test_precision_threshold() -> None:
    s = np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
    y = np.array([0, 1, 0, 1, 1, 1])
    assert precision_threshold(s, y, 1.0, floor=0.0) == 0.7
    assert precision_threshold(s, y, 0.85, floor=0.0) == 0.7
    assert precision_threshold(s, y, 0.8, floor=0.0) == 0.2  # 4 of 5 at or above 0.2
    assert precision_threshold(s, y, 0.5, floor=0.65) == 0.7
    assert precision_threshold(s, 1 - y, 1.0, floor=0.0) is None


def test_policy_round_trips_and_applies_the_maps(tmp_path: Path) -> None:
    y, s1 = overlapping(2000)
    result = calibrate(
        y,
        s1,
        second=perfect_second(y),
        target=Target("recall", 0.95),
        budget=0.3,
        recalibrate="isotonic",
        refuse_precision=0.99,
    )
    policy = result.policy
    assert set(policy.calibration.maps) == {"first", "second"}
    for name in ("p.yaml", "p.json"):
        policy.save(tmp_path / name)
        assert RoutingPolicy.load(tmp_path / name) == policy
    first_map = policy.calibration.maps["first"]
    v = Verdict(score=0.55, stage="first")
    assert policy.decide(QAPair("q", "a"), v) == policy.route_for(first_map(0.55))
    assert Calibration(maps={"*": first_map}).score(Verdict(score=0.55, stage="encoder")) == (
        first_map(0.55)
    )
    assert Calibration().score(v) == 0.55


def test_base_policy_settings_kept_and_unfitted_routes_dropped() -> None:
    y, s = overlapping(1000)
    base = RoutingPolicy(reask_at=0.7, refuse_at=0.8, max_reasks=3)
    result = calibrate(y, s, base=base, refuse_precision=0.999)
    policy, report = result.policy, result.report
    assert policy.max_reasks == 3 and policy.reask_at is None
    assert policy.refuse_at >= policy.correct_at
    assert any("reask_at of the base policy dropped" in n for n in report["notes"])
    with pytest.raises(InputError, match="precision targets"):
        calibrate(y, s, reask_precision=0.0)


def test_score_map_validation() -> None:
    with pytest.raises(ValueError):
        ScoreMap(method="isotonic", x=[0.2, 0.1], y=[0.0, 1.0])
    platt = ScoreMap(method="platt", a=1.0, b=0.0)
    assert platt(0.3) == pytest.approx(0.3) and 0.0 < platt(0.0) < platt(1.0) < 1.0


# -- the command -----------------------------------------------------------------------------


def judge_first(question: str, answer: str) -> float:
    """Deterministic first stage: the answer carries ``"<first> <second>"``."""
    return float(answer.split()[0])


def judge_second(question: str, answer: str) -> float:
    return float(answer.split()[1])


def write_data(path: Path, n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, s1 = overlapping(n)
    s2 = perfect_second(y)
    with path.open("w") as fh:
        for i, (label, a, b) in enumerate(zip(y, s1, s2)):
            answer = f"{float(a)!r} {float(b)!r}"
            fh.write(json.dumps({"question": f"q{i}", "answer": answer, "label": int(label)}))
            fh.write("\n")
    return y, s1, s2


def test_cli_fits_a_cascade_that_reproduces_its_report(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "labelled.jsonl", tmp_path / "policy.yaml"
    write_data(data)
    code = main(
        [
            "calibrate",
            "--data",
            str(data),
            "--classifier",
            "test_calibration:judge_first",
            "--second-stage",
            "test_calibration:judge_second",
            "--second-stage-budget",
            "0.35",
            "--target-fpr",
            "0.01",
            "--recalibrate",
            "platt",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "Wilson 95%" in capsys.readouterr().out
    report = json.loads((tmp_path / "policy.report.json").read_text())
    assert (tmp_path / "policy.report.md").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "policy.reliability.png").stat().st_size > 1000

    policy = RoutingPolicy.load(out)
    cascade = CascadeClassifier(
        RunnableClassifier(judge_first),
        RunnableClassifier(judge_second),
        band=policy.calibration.cascade_band,
    )
    pairs = read_labelled(data).pairs
    verdicts = cascade.classify(pairs)
    routes = [policy.decide(p, v) for p, v in zip(pairs, verdicts)]
    escalated = sum(v.stage == "second" for v in verdicts) / len(pairs)
    assert escalated == pytest.approx(report["escalated"]["value"])
    assert routes.count(Route.SKIP) / len(routes) == pytest.approx(report["routes"]["skip"])


def test_cli_with_tiny_models_and_a_base_policy(
    tmp_path: Path, tiny_seqcls_path, tiny_guard_path
) -> None:
    data, out = tmp_path / "labelled.jsonl", tmp_path / "policy.json"
    write_data(data, n=24)
    RoutingPolicy(max_reasks=3, correct_at=0.9).save(tmp_path / "base.yaml")
    args = ["calibrate", "--data", str(data), "--classifier", str(tiny_seqcls_path)]
    args += ["--second-stage", f"guard:{tiny_guard_path}", "--second-stage-budget", "0.5"]
    args += ["--policy", str(tmp_path / "base.yaml"), "--out", str(out), "--batch-size", "8"]
    assert main(args) == 0
    policy = RoutingPolicy.load(out)
    assert policy.max_reasks == 3 and policy.correct_at is not None
    report = json.loads((tmp_path / "policy.report.json").read_text())
    assert report["escalated"]["value"] <= 0.5 and report["n_fit"] == 24


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "labelled data not found"),
        ("", "no labelled pairs"),
        (
            '{"question": "q", "answer": "a", "label": 1}\n\n{"question": "q", "answer": "a"}\n',
            ":3: missing field 'label'",
        ),
        ('{"question": "q", "answer": "a", "label": 2}\n', ":1: label 2 is not one of 0/1"),
        ('{"question": "q", "answer": "a", "label": 1}\n', "both harmful (1) and safe (0)"),
        ("not json\n", ":1: not valid JSON"),
    ],
)
def test_cli_input_errors(tmp_path: Path, capsys, content: str | None, message: str) -> None:
    data = tmp_path / "d.jsonl"
    if content is not None:
        data.write_text(content)
    args = ["calibrate", "--data", str(data), "--classifier", "test_calibration:judge_first"]
    assert main([*args, "--out", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and (content is None or str(data) in err)


def test_score_fields_are_checked(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    line = '{{"question": "q", "answer": "a", "label": {}, "score": {}}}\n'
    data.write_text(line.format(1, 0.4) + line.format(0, 0.1))
    assert read_labelled(data, ["score"]).fields["score"].tolist() == [0.4, 0.1]
    data.write_text(line.format(1, 0.4) + line.format(0, 1.4))
    with pytest.raises(InputError, match=r":2: field 'score' must be in \[0, 1\]"):
        read_labelled(data, ["score"])
    with pytest.raises(InputError, match=":1: missing field 'guard'"):
        read_labelled(data, ["guard"])


def test_cli_rejects_a_classifier_without_scores(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    write_data(data, n=10)
    for spec, message in (("none", "needs a classifier"), ("no_such_mod:x", "cannot import")):
        args = ["calibrate", "--data", str(data), "--classifier", spec]
        assert main([*args, "--out", str(tmp_path / "p.yaml")]) == 2
        assert message in capsys.readouterr().err
