"""The routing policy: from a classifier's verdict to skip, correct, re-ask or refuse.

Scores are cut into bands: below ``correct_at`` the answer is skipped, from ``correct_at`` it is
corrected, from ``reask_at`` the upstream is asked again, from ``refuse_at`` it is refused.
Per-category thresholds can send an answer to a stricter route than its overall score would.
A policy is a pydantic model, so it loads from and saves to YAML or JSON.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aligner_chain.errors import ConfigurationError
from aligner_chain.record import Route
from aligner_chain.types import QAPair, Verdict

RouteRule = Callable[[QAPair, Verdict, Route], "Route | str | None"]
"""A user hook ``(pair, verdict, proposed_route) -> route or None``; None keeps the proposal."""

_SEVERITY = {Route.SKIP: 0, Route.CORRECT: 1, Route.REASK: 2, Route.REFUSE: 3}

DEFAULT_REFUSAL = (
    "I'm sorry, but I can't help with that. If you need support, please reach out to a "
    "qualified professional or a trusted resource."
)


class Bands(BaseModel):
    """Score thresholds; ``None`` disables a route. Each must be >= the one before it."""

    model_config = ConfigDict(extra="forbid")

    correct_at: float | None = Field(default=0.5, ge=0.0, le=1.0)
    reask_at: float | None = Field(default=None, ge=0.0, le=1.0)
    refuse_at: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Bands:
        set_values = [v for v in (self.correct_at, self.reask_at, self.refuse_at) if v is not None]
        if set_values != sorted(set_values):
            raise ValueError("bands must satisfy correct_at <= reask_at <= refuse_at")
        return self

    def route_for(self, score: float) -> Route:
        for route, threshold in (
            (Route.REFUSE, self.refuse_at),
            (Route.REASK, self.reask_at),
            (Route.CORRECT, self.correct_at),
        ):
            if threshold is not None and score >= threshold:
                return route
        return Route.SKIP


class ScoreMap(BaseModel):
    """A monotone map from one classifier's raw score to a calibrated probability of harm.

    ``platt``: ``sigmoid(a * logit(score) + b)``. ``isotonic``: linear interpolation through the
    fitted points ``(x, y)``, flat beyond the ends (what scikit-learn's ``predict`` does).
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["platt", "isotonic"]
    a: float = 1.0
    b: float = 0.0
    x: list[float] = Field(default_factory=list)
    y: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _points(self) -> ScoreMap:
        if self.method == "isotonic" and (
            not self.x
            or len(self.x) != len(self.y)
            or any(b <= a for a, b in zip(self.x, self.x[1:]))
            or any(b < a for a, b in zip(self.y, self.y[1:]))
        ):
            raise ValueError("isotonic needs equally long x (increasing) and y (non-decreasing)")
        return self

    def __call__(self, score: float) -> float:
        if self.method == "platt":
            p = min(max(score, 1e-7), 1.0 - 1e-7)
            return 0.5 * (1.0 + math.tanh((self.a * math.log(p / (1.0 - p)) + self.b) / 2.0))
        i = bisect.bisect_right(self.x, score)
        if i == 0:
            return self.y[0]
        if i == len(self.x):
            return self.y[-1]
        x0, x1, y0, y1 = self.x[i - 1], self.x[i], self.y[i - 1], self.y[i]
        return y0 + (y1 - y0) * (score - x0) / (x1 - x0)


class Calibration(BaseModel):
    """Score re-calibration fitted by ``aligner-chain calibrate``, applied before the bands.

    ``maps`` is keyed by :attr:`Verdict.stage`: ``"first"``/``"second"`` for the two stages of a
    :class:`~aligner_chain.classifiers.CascadeClassifier` (so both land on one probability scale
    and one set of bands fits both), ``"*"`` for any other verdict. ``cascade_band`` is the
    uncertain band fitted with it, in raw first-stage scores, to build the cascade from.
    """

    model_config = ConfigDict(extra="forbid")

    maps: dict[str, ScoreMap] = Field(default_factory=dict)
    cascade_band: tuple[float, float] | None = None

    def score(self, verdict: Verdict) -> float:
        """The verdict's score through its stage's map (unchanged when none applies)."""
        score_map = self.maps.get(verdict.stage or "*") or self.maps.get("*")
        return score_map(verdict.score) if score_map else verdict.score


class RoutingPolicy(Bands):
    """How answers are routed, and what happens when a stage fails.

    - ``mode``: ``route`` (classify, then route by score), ``always`` (correct every answer, the
      paper's setting) or ``shadow`` (classify and record the route, change nothing).
    - ``category_bands``: stricter bands per category name, applied to that category's score.
    - ``max_reasks``: how many times the upstream may be asked again for one answer.
    - ``reask_with_draft``: include the corrector's draft in the re-ask feedback as guidance.
    - ``verify_after_correct``: classify the correction; if it is still at or above
      ``correct_at``, apply ``fallback``. A correction identical to the answer keeps the
      verdict that answer already had (the same pair is not classified twice).
    - ``fallback``: what replaces an answer that could not be made safe: ``refuse`` (the
      ``refusal_message``), ``original`` (keep the upstream answer) or ``raise``
      (:class:`~aligner_chain.errors.RefusedError`).
    - ``on_error``: ``fail_open`` keeps the original answer when a classifier or corrector
      fails; ``fail_closed`` refuses. The error is recorded either way.
    - ``record``: store every decision with the attached recorder (opt-in: records hold user text).
    - ``calibration``: optional :class:`Calibration` applied to the overall score before banding.
    - ``stream``: ``buffer`` judges the whole answer before releasing it; ``sentence`` releases
      it a sentence at a time, each sentence only after it was judged with the question and the
      text already released (a flagged sentence is replaced by a correction, or the stream ends
      with the fallback). ``stream_max_chars``/``stream_max_ms`` bound the hold-back of one
      sentence; ``stream_language`` guides sentence splitting.
    """

    mode: Literal["route", "always", "shadow"] = "route"
    category_bands: dict[str, Bands] = Field(default_factory=dict)
    max_reasks: int = Field(default=1, ge=0, le=10)
    reask_with_draft: bool = False
    reask_feedback: str = (
        "Your previous answer was flagged as potentially harmful{detail}. Write a new answer to "
        "the same request that is helpful where it is safe to help, and declines only the "
        "harmful part."
    )
    verify_after_correct: bool = True
    fallback: Literal["refuse", "original", "raise"] = "refuse"
    refusal_message: str = DEFAULT_REFUSAL
    on_error: Literal["fail_open", "fail_closed"] = "fail_open"
    record: bool = False
    stream: Literal["buffer", "sentence"] = "buffer"
    stream_max_chars: int = Field(default=600, ge=20)
    stream_max_ms: float = Field(default=3000.0, gt=0)
    stream_language: str = "en"
    calibration: Calibration | None = None

    def decide(self, pair: QAPair, verdict: Verdict, rule: RouteRule | None = None) -> Route:
        """The route for one verdict: the strictest of the overall and per-category bands."""
        overall = self.calibration.score(verdict) if self.calibration else verdict.score
        route = self.route_for(overall)
        for name, bands in self.category_bands.items():
            score = verdict.categories.get(name)
            if score is not None:
                candidate = bands.route_for(score)
                if _SEVERITY[candidate] > _SEVERITY[route]:
                    route = candidate
        if rule is not None:
            override = rule(pair, verdict, route)
            if override is not None:
                try:
                    route = Route(override)
                except ValueError as exc:
                    raise ConfigurationError(f"route rule returned {override!r}") from exc
        return route

    def is_flagged(self, verdict: Verdict) -> bool:
        """Whether a verdict would be routed anywhere but skip (used to verify corrections)."""
        return self.decide(QAPair("", ""), verdict) is not Route.SKIP

    def feedback(self, verdict: Verdict | None, draft: str | None = None) -> str:
        """The message sent to the upstream model on a re-ask."""
        detail = ""
        if verdict is not None:
            top = sorted(verdict.categories.items(), key=lambda kv: -kv[1])[:3]
            named = ", ".join(name for name, score in top if score >= 0.5)
            detail = f" (score {verdict.score:.2f}" + (f"; {named}" if named else "") + ")"
        text = self.reask_feedback.replace("{detail}", detail)
        if draft and self.reask_with_draft:
            text += f"\n\nA safer draft you may use as guidance:\n{draft}"
        return text

    # -- files -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> RoutingPolicy:
        """Load a policy from a ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read policy file {path}: {exc}") from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"policy file {path} is not valid: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigurationError(f"policy file {path} must hold a mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigurationError(f"policy file {path}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        """Write the policy as YAML (or JSON when the suffix is ``.json``)."""
        path = Path(path)
        data = self.model_dump(mode="json")
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data)
        path.write_text(text, encoding="utf-8")
