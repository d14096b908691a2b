"""Fit routing bands, score re-calibration and a cascade's uncertain band to labelled traffic.

A threshold tuned on one public set lands far from the best threshold on another, so the bands
must come from the user's own sample. Given one label per pair (1 = harmful) and the scores of
one classifier (or both stages of a cascade) this module:

- optionally fits an isotonic or Platt map per stage, so scores read as probabilities and one set
  of bands fits both stages of a cascade;
- picks ``correct_at`` for a target false-positive rate (max recall) or a target recall (min FPR),
  and, for a cascade, the band of first-stage scores sent to the second stage, at most a given
  share of traffic, that serves the target best;
- optionally raises ``reask_at``/``refuse_at`` to where flagged answers are harmful with a given
  precision;
- reports precision, recall and FPR with Wilson 95% intervals, the share of traffic per route,
  and a reliability diagram.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.errors import InputError
from aligner_chain.evaluation import labelled_pair
from aligner_chain.record import Route
from aligner_chain.routing import Bands, Calibration, RoutingPolicy, ScoreMap
from aligner_chain.training.data import json_objects
from aligner_chain.types import QAPair

Method = Literal["none", "platt", "isotonic"]
MAX_THRESHOLDS = 1000
"""Candidate thresholds per cascade search (quantiles beyond this), which bounds its cost."""


@dataclass(frozen=True)
class Target:
    """The operating point: ``fpr`` (flag as much harm as possible at this false-positive rate)
    or ``recall`` (flag at least this share of harm with as few false positives as possible)."""

    metric: Literal["fpr", "recall"]
    value: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise InputError(f"target {self.metric} must be in [0, 1], got {self.value}")


@dataclass
class LabelledData:
    """Pairs, labels (1 = harmful) and any score fields read from the file."""

    pairs: list[QAPair]
    labels: np.ndarray
    fields: dict[str, np.ndarray] = field(default_factory=dict)


def read_labelled(path: str | Path, score_fields: Sequence[str] = ()) -> LabelledData:
    """Read ``{"question", "answer", "label"}`` objects from JSONL or a JSON list.

    Rows follow ``aligner-chain eval``'s rules (label 0/1, safe/harmful, true/false), except
    that every row needs a label. ``score_fields`` names extra numeric fields every row must
    carry (scores logged earlier). Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: labelled data not found")
    pairs: list[QAPair] = []
    labels: list[int] = []
    scores: dict[str, list[float]] = {name: [] for name in score_fields}
    for where, obj in json_objects(path):
        row = labelled_pair(obj, where)
        missing = [f for f in ("label", *score_fields) if obj.get(f) is None]
        if missing or row.label is None:
            raise InputError(f"{where}: missing field {', '.join(map(repr, missing or ['label']))}")
        for name in score_fields:
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{where}: field {name!r} must be a number")
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{where}: field {name!r} must be in [0, 1], got {value}")
            scores[name].append(float(value))
        pairs.append(QAPair(row.question, row.answer, obj.get("context")))
        labels.append(row.label)
    if not pairs:
        raise InputError(f"{path}: no labelled pairs")
    y = np.asarray(labels, dtype=np.int64)
    if y.min() == y.max():
        raise InputError(f"{path}: calibration needs both harmful (1) and safe (0) examples")
    return LabelledData(pairs, y, {k: np.asarray(v) for k, v in scores.items()})


def score_pairs(
    classifier: HarmClassifier, pairs: Sequence[QAPair], batch_size: int = 64
) -> np.ndarray:
    """Raw scores of ``classifier`` on every pair, in batches to bound memory."""
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        out.extend(v.score for v in classifier.classify(pairs[start : start + batch_size]))
    return np.asarray(out, dtype=np.float64)


# -- re-calibration --------------------------------------------------------------------------


def fit_map(scores: np.ndarray, labels: np.ndarray, method: Method) -> ScoreMap | None:
    """Fit a monotone map from raw scores to P(harmful); ``none`` returns None."""
    if method == "none":
        return None
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
        return ScoreMap(
            method="isotonic", x=iso.X_thresholds_.tolist(), y=iso.y_thresholds_.tolist()
        )
    from sklearn.linear_model import LogisticRegression

    p = np.clip(scores, 1e-7, 1.0 - 1e-7)
    logit = np.log(p / (1.0 - p)).reshape(-1, 1)
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(logit, labels)
    return ScoreMap(method="platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))


def apply_map(score_map: ScoreMap | None, scores: np.ndarray) -> np.ndarray:
    """The map applied to an array (the same code the policy runs per verdict)."""
    if score_map is None:
        return scores
    return np.fromiter((score_map(float(s)) for s in scores), dtype=np.float64, count=len(scores))


def reliability(
    scores: np.ndarray, labels: np.ndarray, bins: int = 10
) -> list[tuple[int, float, float]]:
    """``(count, mean score, observed harmful share)`` per non-empty equal-width score bin."""
    index = np.minimum((scores * bins).astype(int), bins - 1)
    return [
        (int(mask.sum()), float(scores[mask].mean()), float(labels[mask].mean()))
        for mask in (index == b for b in range(bins))
        if mask.any()
    ]


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean |predicted - observed| over the reliability bins, weighted by bin size."""
    return sum(n * abs(p - o) for n, p, o in reliability(scores, labels)) / len(scores)


def wilson(k: np.ndarray, n: int, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (95% by default) of the proportions ``k / n``."""
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return np.maximum(0.0, centre - half), np.minimum(1.0, centre + half)


# -- thresholds and bands --------------------------------------------------------------------


def _candidates(values: np.ndarray) -> np.ndarray:
    unique = np.unique(values)
    if len(unique) > MAX_THRESHOLDS:
        unique = np.unique(np.quantile(unique, np.linspace(0.0, 1.0, MAX_THRESHOLDS)))
    return unique


def _budget_windows(ordered: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``[start, stop)`` into sorted first-stage scores: one per distinct starting score,
    as wide as the budget allows without splitting tied scores; plus the empty window."""
    _, first = np.unique(ordered, return_index=True)
    bounds = np.append(first, len(ordered))
    limit = math.floor(budget * len(ordered) + 1e-9)
    ends = np.searchsorted(bounds, first + limit, side="right") - 1
    keep = ends > np.arange(len(first))
    return np.append(first[keep], 0), np.append(bounds[ends[keep]], 0)


def _trim(start: int, stop: int, agree: np.ndarray, ordered: np.ndarray) -> tuple[int, int]:
    """Shrink a window while its edge groups of tied scores would be decided the same by either
    stage: escalating them costs second-stage calls and changes nothing."""
    while start < stop:
        end = int(np.searchsorted(ordered, ordered[start], side="right"))
        if end > stop or not agree[start:end].all():
            break
        start = end
    while start < stop:
        begin = int(np.searchsorted(ordered, ordered[stop - 1], side="left"))
        if begin < start or not agree[begin:stop].all():
            break
        stop = begin
    return start, stop


def fit_operating_point(
    labels: np.ndarray,
    first: np.ndarray,
    target: Target,
    *,
    raw_first: np.ndarray | None = None,
    second: np.ndarray | None = None,
    budget: float = 0.0,
    conservative: bool = False,
) -> tuple[float, tuple[float, float] | None]:
    """``(correct_at, band)`` meeting ``target`` best.

    One stage: the threshold on ``first``. A cascade (``second`` given): also the band of
    ``raw_first`` scores (inclusive, at most ``budget`` of the pairs) whose pairs are decided by
    ``second`` instead; both stages are compared with the same threshold, so pass calibrated
    scores. Ties go to fewer escalations, and the band is trimmed to the pairs where the stages
    disagree. ``conservative`` holds the Wilson 95% bound, not the sample rate, to the target
    (FPR upper bound <= target, recall lower bound >= target), which leaves room for the
    optimism of choosing among many thresholds on one sample. When an FPR target cannot be met
    the threshold flags nothing.
    """
    if second is None or raw_first is None or budget <= 0.0:
        second, raw_first, budget = first, first, 0.0
    order = np.argsort(raw_first, kind="stable")
    ordered, y = raw_first[order], labels[order].astype(bool)
    c1, c2 = first[order], second[order]
    starts, stops = _budget_windows(ordered, budget)
    positives, negatives = int(y.sum()), int((~y).sum())
    best: tuple[tuple[float, ...], int] | None = None
    for t in _candidates(np.concatenate([c1, c2]) if budget else c1):
        f1, f2 = c1 >= t, c2 >= t
        cum = [np.concatenate([[0], np.cumsum(v)]) for v in (y & f1, y & f2, ~y & f1, ~y & f2)]
        tp = cum[0][-1] - (cum[0][stops] - cum[0][starts]) + (cum[1][stops] - cum[1][starts])
        fp = cum[2][-1] - (cum[2][stops] - cum[2][starts]) + (cum[3][stops] - cum[3][starts])
        escalated = stops - starts
        if target.metric == "fpr":
            bound = wilson(fp, negatives)[1] if conservative else fp / negatives
            ok = bound <= target.value + 1e-9
            keys = (-tp, escalated, fp)
        else:
            bound = wilson(tp, positives)[0] if conservative else tp / positives
            ok = bound >= target.value - 1e-9
            keys = (fp, escalated, -tp)
        if not ok.any():
            continue
        idx = np.flatnonzero(ok)
        pick = int(idx[np.lexsort(tuple(k[idx] for k in reversed(keys)))[0]])
        key = (*(float(k[pick]) for k in keys), float(t))
        if best is None or key < best[0]:
            best = (key, pick)
    if best is None:  # only an FPR target can be unreachable
        return float(min(1.0, np.nextafter(max(c1.max(), c2.max()), 2.0))), None
    t, pick = best[0][-1], best[1]
    start, stop = _trim(int(starts[pick]), int(stops[pick]), (c1 >= t) == (c2 >= t), ordered)
    return t, (float(ordered[start]), float(ordered[stop - 1])) if stop > start else None


def precision_threshold(
    scores: np.ndarray, labels: np.ndarray, precision: float, floor: float
) -> float | None:
    """The lowest threshold >= ``floor`` above which answers are harmful with ``precision``."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    flagged = np.arange(1, len(s) + 1)
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # the end of each tied run
    ok = [i for i in last if s[i] >= floor and tp[i] >= precision * flagged[i] and tp[i] > 0]
    return float(s[ok[-1]]) if ok else None


# -- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A proportion ``k / n`` with its Wilson 95% interval."""

    value: float
    low: float
    high: float
    k: int
    n: int

    @classmethod
    def of(cls, k: int, n: int) -> Estimate:
        if n == 0:
            return cls(math.nan, 0.0, 1.0, 0, 0)
        low, high = wilson(np.asarray(k), n)
        return cls(k / n, float(low), float(high), int(k), int(n))

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.k}/{self.n})"


def evaluate(
    final: np.ndarray, labels: np.ndarray, bands: Bands, escalated: np.ndarray | None = None
) -> dict[str, Any]:
    """Precision/recall/FPR of "any route but skip", route shares and escalation share."""
    y = labels.astype(bool)
    routes = [bands.route_for(float(s)) for s in final]
    flagged = np.array([r is not Route.SKIP for r in routes])
    tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
    out: dict[str, Any] = {
        "precision": Estimate.of(tp, int(flagged.sum())),
        "recall": Estimate.of(tp, int(y.sum())),
        "fpr": Estimate.of(fp, int((~y).sum())),
        "routes": {r.value: routes.count(r) / len(routes) for r in _ROUTES},
    }
    if escalated is not None:
        out["escalated"] = Estimate.of(int(escalated.sum()), len(escalated))
    return out


_ROUTES = (Route.SKIP, Route.CORRECT, Route.REASK, Route.REFUSE)


# -- the whole fit ---------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """The fitted policy, what the report shows about it, and the evaluated scores per stage
    (raw, re-calibrated) with their labels, for the reliability diagram."""

    policy: RoutingPolicy
    report: dict[str, Any]
    curves: dict[str, tuple[np.ndarray, np.ndarray | None]]
    labels: np.ndarray

    def to_json(self) -> str:
        def plain(value: Any) -> Any:
            if isinstance(value, Estimate):
                return plain(asdict(value))
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return json.dumps(plain(self.report), indent=2)


def calibrate(
    labels: np.ndarray,
    first: np.ndarray,
    *,
    second: np.ndarray | None = None,
    target: Target = Target("fpr", 0.05),
    budget: float = 0.1,
    recalibrate: Method = "none",
    reask_precision: float | None = None,
    refuse_precision: float | None = None,
    holdout: float = 0.0,
    seed: int = 0,
    base: RoutingPolicy | None = None,
    conservative: bool = False,
) -> CalibrationResult:
    """Fit a policy on ``(labels, first[, second])`` raw scores; see the module docstring.

    ``holdout`` keeps that share of the sample (stratified) out of the fit and reports on it;
    with 0 the report is in-sample and therefore optimistic.
    """
    if not 0.0 <= holdout < 1.0:
        raise InputError(f"holdout must be in [0, 1), got {holdout}")
    if not 0.0 <= budget <= 1.0:
        raise InputError(f"second-stage budget must be in [0, 1], got {budget}")
    for precision in (reask_precision, refuse_precision):
        if precision is not None and not 0.0 < precision <= 1.0:
            raise InputError(f"precision targets must be in (0, 1], got {precision}")
    fit_idx, eval_idx = _split(labels, holdout, seed)
    y_fit, y_eval = labels[fit_idx], labels[eval_idx]
    stages = {"first": first} if second is None else {"first": first, "second": second}
    maps = {name: fit_map(s[fit_idx], y_fit, recalibrate) for name, s in stages.items()}
    cal = {name: apply_map(maps[name], s) for name, s in stages.items()}

    correct_at, band = fit_operating_point(
        y_fit,
        cal["first"][fit_idx],
        target,
        raw_first=first[fit_idx],
        second=None if second is None else cal["second"][fit_idx],
        budget=budget,
        conservative=conservative,
    )

    def combined(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if band is None or second is None:
            return cal["first"][idx], None if second is None else np.zeros(len(idx), bool)
        inside = (first[idx] >= band[0]) & (first[idx] <= band[1])
        return np.where(inside, cal["second"][idx], cal["first"][idx]), inside

    final_fit, _ = combined(fit_idx)
    base = base or RoutingPolicy()
    notes: list[str] = []
    upper: dict[str, float | None] = {}
    for name, precision in (("reask_at", reask_precision), ("refuse_at", refuse_precision)):
        floor = max([correct_at, *(v for v in upper.values() if v is not None)])
        value = None
        if precision is not None:
            value = precision_threshold(final_fit, y_fit, precision, floor)
            if value is None:
                notes.append(f"no threshold reaches precision {precision}: {name} is off")
        elif getattr(base, name) is not None:
            notes.append(f"{name} of the base policy dropped: fit it with a precision target")
        upper[name] = value
    stored = {k: v for k, v in maps.items() if v is not None}
    if second is None and "first" in stored:
        stored = {"*": stored["first"]}
    calibration = Calibration(maps=stored, cascade_band=band) if stored or band else None
    policy = base.model_copy(update={"correct_at": correct_at, **upper, "calibration": calibration})
    policy = RoutingPolicy.model_validate(policy.model_dump())  # re-check the band order

    final_eval, inside = combined(eval_idx)
    report: dict[str, Any] = {
        "n_fit": len(fit_idx),
        "n_evaluated": len(eval_idx),
        "evaluated_on": "a held-out split" if holdout else "the fit sample: in-sample, optimistic",
        "harmful_share": float(labels.mean()),
        "target": {"metric": target.metric, "value": target.value, "conservative": conservative},
        "recalibration": recalibrate,
        "thresholds": {"correct_at": correct_at, **upper},
        "cascade_band": list(band) if band else None,
        "second_stage_budget": budget if second is not None else None,
        **evaluate(final_eval, y_eval, policy, inside),
        "notes": notes,
        "ece": {
            name: {
                "raw": expected_calibration_error(s[eval_idx], y_eval),
                "calibrated": None
                if maps[name] is None
                else expected_calibration_error(cal[name][eval_idx], y_eval),
            }
            for name, s in stages.items()
        },
    }
    if second is not None:  # what each stage alone would do at the same target
        report["alone"] = {}
        for name in stages:
            t, _ = fit_operating_point(y_fit, cal[name][fit_idx], target, conservative=conservative)
            alone = evaluate(cal[name][eval_idx], y_eval, Bands(correct_at=t))
            report["alone"][name] = {"correct_at": t, **alone}
    curves = {
        name: (s[eval_idx], None if maps[name] is None else cal[name][eval_idx])
        for name, s in stages.items()
    }
    return CalibrationResult(policy, report, curves, y_eval)


def _split(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    everything = np.arange(len(labels))
    if holdout == 0.0:
        return everything, everything
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for value in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == value))
        held.append(idx[: max(1, round(holdout * len(idx)))])
    eval_idx = np.sort(np.concatenate(held))
    fit_idx = np.setdiff1d(everything, eval_idx)
    if labels[fit_idx].min() == labels[fit_idx].max():
        raise InputError("too few examples of one label to hold any out; lower --holdout")
    return fit_idx, eval_idx


# -- report ----------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """A short plain-text (Markdown) summary of a calibration report."""
    t = report["thresholds"]
    lines = [
        "# Calibration report",
        "",
        f"- sample: {report['n_fit']} pairs fitted, {report['n_evaluated']} evaluated "
        f"({report['evaluated_on']}); harmful share {report['harmful_share']:.3f}",
        f"- target: {report['target']['metric']} {report['target']['value']}"
        + (" (Wilson 95% bound)" if report["target"]["conservative"] else "")
        + f"; re-calibration: {report['recalibration']}",
        "- thresholds: " + ", ".join(f"{k} = {_num(v)}" for k, v in t.items()),
    ]
    if report["second_stage_budget"] is not None:
        band = report["cascade_band"]
        lines.append(
            f"- cascade band (raw first-stage scores): "
            f"{'none' if band is None else f'[{band[0]:.4f}, {band[1]:.4f}]'} "
            f"(budget {report['second_stage_budget']:.3f}); escalated {report['escalated']}"
        )
    lines += [
        "",
        "Flagged (any route but skip), Wilson 95% intervals:",
        "",
        f"- precision {report['precision']}",
        f"- recall    {report['recall']}",
        f"- FPR       {report['fpr']}",
        "- traffic per route: "
        + ", ".join(f"{k} {v:.1%}" for k, v in report["routes"].items() if v or k == "skip"),
        "- expected calibration error: "
        + "; ".join(
            f"{name} {e['raw']:.3f} raw"
            + ("" if e["calibrated"] is None else f", {e['calibrated']:.3f} re-calibrated")
            for name, e in report["ece"].items()
        ),
    ]
    for name, alone in report.get("alone", {}).items():
        lines.append(
            f"- {name} stage alone at the same target: correct_at {alone['correct_at']:.4f}, "
            f"recall {alone['recall']}, FPR {alone['fpr']}"
        )
    lines += [f"- note: {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "off" if value is None else f"{value:.4f}"


def reliability_diagram(
    path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray | None]], labels: np.ndarray
) -> None:
    """Write a PNG: observed harmful share per score bin, raw and re-calibrated, per stage.

    Needs matplotlib (``pip install 'aligner-chain[report]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 4.2), squeeze=False)
    for ax, (name, (raw, cal)) in zip(axes[0], curves.items()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
        variants = {"raw": raw} if cal is None else {"raw": raw, "re-calibrated": cal}
        for label, scores in variants.items():
            _, xs, ys = zip(*reliability(scores, labels))
            ax.plot(xs, ys, marker="o", label=label)
        ax.set(title=f"{name} stage", xlabel="predicted P(harmful)", ylabel="observed share")
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
