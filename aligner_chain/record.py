"""The decision record: what was decided for one answer, and why.

Every answer that passes through the step carries one, in
``AIMessage.response_metadata["aligner"]``. It always holds the upstream's original answer, so
nothing the upstream said is lost, whatever the route.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field

from aligner_chain.types import Verdict


class Route(str, Enum):
    """What the policy decided for an answer."""

    SKIP = "skip"
    CORRECT = "correct"
    REASK = "reask"
    REFUSE = "refuse"
    PASSTHROUGH = "passthrough"  # not judged: e.g. an AI turn with tool calls


class DecisionRecord(BaseModel):
    """One answer's journey through classify → route → correct/re-ask/refuse."""

    route: Route
    initial_route: Route
    mode: str
    question: str
    original_answer: str
    final_answer: str
    corrected_answer: str | None = None
    verdict_before: Verdict | None = None
    verdict_after: Verdict | None = None
    reask_count: int = 0
    reask_answers: list[str] = Field(default_factory=list)
    fallback: str | None = None
    changed: bool = False
    truncated: bool = False
    errors: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    stream_events: list[dict[str, Any]] = Field(default_factory=list)
    classifier_id: str | None = None
    corrector_id: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    )

    @property
    def score_before(self) -> float | None:
        return None if self.verdict_before is None else self.verdict_before.score

    @property
    def score_after(self) -> float | None:
        return None if self.verdict_after is None else self.verdict_after.score

    def to_metadata(self) -> dict[str, Any]:
        """A JSON-safe dict, as stored on messages and in checkpoints."""
        return self.model_dump(mode="json")


class Stopwatch:
    """Accumulates per-stage wall time in milliseconds into a record's ``timings_ms``."""

    def __init__(self, timings: dict[str, float], stage: str) -> None:
        self.timings, self.stage = timings, stage

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = (time.perf_counter() - self.start) * 1000
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + elapsed
