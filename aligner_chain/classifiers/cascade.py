"""Two-stage classification: a cheap model on every pair, a strong one only where it is unsure.

A ~22M-parameter encoder separates most traffic well but not the ambiguous middle; a large guard
model is accurate but costs orders of magnitude more per pair. The cascade spends the expensive
calls only on pairs whose first-stage score falls inside the uncertain band, and sends them as one
batch so a GPU server or remote endpoint sees a single request. ``aligner-chain calibrate`` fits
the band to a budget of second-stage calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.errors import ClassifierError, ConfigurationError
from aligner_chain.types import QAPair, Verdict

FIRST, SECOND = "first", "second"
"""The values of :attr:`Verdict.stage` on a cascade verdict: which stage decided."""


class CascadeClassifier(HarmClassifier):
    """``first`` scores every pair; pairs with ``low <= score <= high`` are re-scored by ``second``.

    The returned verdict is the deciding stage's own verdict (score, categories, classifier id),
    with ``stage`` set to ``"first"`` or ``"second"`` and ``details`` carrying ``first_score``
    and, when escalated, ``second_score``, so a decision log shows both opinions.
    """

    def __init__(
        self,
        first: HarmClassifier,
        second: HarmClassifier,
        band: tuple[float, float] = (0.2, 0.8),
        *,
        classifier_id: str | None = None,
    ) -> None:
        low, high = (float(v) for v in band)
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigurationError(f"cascade band must satisfy 0 <= low <= high <= 1, got {band}")
        self.first = first
        self.second = second
        self.band = (low, high)
        self.classifier_id = (
            classifier_id or f"cascade({first.classifier_id} > {second.classifier_id})"
        )

    def escalated(self, verdicts: Sequence[Verdict]) -> list[int]:
        """Indices of the first-stage verdicts inside the band."""
        low, high = self.band
        return [i for i, v in enumerate(verdicts) if low <= v.score <= high]

    def _merge(
        self, first: list[Verdict], escalated: list[int], second: list[Verdict]
    ) -> list[Verdict]:
        if len(second) != len(escalated):
            raise ClassifierError(
                f"{self.second.classifier_id} returned {len(second)} verdicts "
                f"for {len(escalated)} pairs"
            )
        out = [
            v.model_copy(update={"stage": FIRST, "details": {**v.details, "first_score": v.score}})
            for v in first
        ]
        for i, v in zip(escalated, second, strict=True):
            details = {**v.details, "first_score": first[i].score, "second_score": v.score}
            details["first_classifier"] = first[i].classifier_id or self.first.classifier_id
            out[i] = v.model_copy(update={"stage": SECOND, "details": details})
        return out

    def classify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        first = self.first.classify(pairs)
        escalated = self.escalated(first)
        second = self.second.classify([pairs[i] for i in escalated]) if escalated else []
        return self._merge(first, escalated, second)

    async def aclassify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        first = await self.first.aclassify(pairs)
        escalated = self.escalated(first)
        second = await self.second.aclassify([pairs[i] for i in escalated]) if escalated else []
        return self._merge(first, escalated, second)
