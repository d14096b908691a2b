"""Encoder or decoder sequence classifiers (``AutoModelForSequenceClassification``) as judges."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from aligner_chain.batching import BatchingConfig, make_runner
from aligner_chain.classifiers.base import BatchedHarmClassifier
from aligner_chain.errors import ClassifierError, ConfigurationError
from aligner_chain.loading import DeviceSpec, DtypeSpec, load_pretrained
from aligner_chain.types import QAPair, Verdict

_SAFE_NAMES = {"safe", "benign", "harmless", "non-toxic", "not_toxic", "neutral", "ok", "label_0"}

BEAVER_DAM_CATEGORIES: tuple[str, ...] = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
)


class SequenceClassifier(BatchedHarmClassifier):
    """Any ``AutoModelForSequenceClassification`` as a harm classifier.

    Args:
        model: local folder or hub id.
        harm_labels: label names that mean "harmful". By default every label except the usual
            safe names (``safe``, ``benign``, ``LABEL_0``, ...).
        multi_label: sigmoid per label (score = max over harm labels) instead of a softmax
            (score = sum of harm-label probabilities).
        input_template: a format string with ``{question}`` and ``{answer}`` building one text;
            ``None`` feeds question and answer as a text pair.
        max_length: tokens per input; longer inputs keep the *end* of the answer.
        batching: coalesce concurrent calls into shared forward passes
            (:class:`~aligner_chain.batching.BatchingConfig`); ``False`` runs each call alone.
    """

    def __init__(
        self,
        model: str,
        *,
        harm_labels: Sequence[str] | None = None,
        multi_label: bool = False,
        input_template: str | None = None,
        max_length: int = 512,
        device: DeviceSpec = "auto",
        dtype: DtypeSpec = "auto",
        trust_remote_code: bool = False,
        classifier_id: str | None = None,
        batching: BatchingConfig | bool = True,
    ) -> None:
        self.loaded = load_pretrained(
            AutoModelForSequenceClassification,
            model,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        id2label = {int(k): str(v) for k, v in self.loaded.model.config.id2label.items()}
        self.labels = [id2label[i] for i in sorted(id2label)]
        if harm_labels is None:
            harm_labels = [name for name in self.labels if name.lower() not in _SAFE_NAMES]
        unknown = set(harm_labels) - set(self.labels)
        if unknown or not harm_labels:
            raise ConfigurationError(
                f"harm_labels {sorted(unknown) or '[]'} not among the model's labels {self.labels}"
            )
        self.harm_index = [self.labels.index(name) for name in harm_labels]
        self.multi_label = multi_label
        self.input_template = input_template
        self.max_length = max_length
        self.classifier_id = classifier_id or model
        self.batcher = make_runner(self._classify_batch, batching)

    @classmethod
    def beaver_dam(
        cls, model: str = "PKU-Alignment/beaver-dam-7b", **kwargs: Any
    ) -> SequenceClassifier:
        """PKU beaver-dam-7b: QA moderation over 14 categories, sigmoid per category."""
        kwargs.setdefault("multi_label", True)
        kwargs.setdefault(
            "input_template", "BEGINNING OF CONVERSATION: USER: {question} ASSISTANT:{answer}"
        )
        return cls(model, **kwargs)

    def _encode(self, pairs: Sequence[QAPair]) -> dict[str, torch.Tensor]:
        tok = self.loaded.tokenizer
        with self.loaded.lock:
            if self.input_template is not None:
                texts = [
                    self.input_template.format(question=p.question, answer=p.answer) for p in pairs
                ]
                enc = tok(
                    texts,
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    padding_side="left",
                    return_tensors="pt",
                )
            else:
                enc = tok(
                    [p.question for p in pairs],
                    [p.answer for p in pairs],
                    truncation="longest_first",
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                )
        return {k: v.to(self.loaded.device) for k, v in enc.items()}

    def _classify_batch(self, pairs: list[QAPair]) -> list[Verdict]:
        try:
            with torch.inference_mode():
                logits = self.loaded.model(**self._encode(pairs)).logits.float()
        except (RuntimeError, ValueError) as exc:
            raise ClassifierError(f"{self.classifier_id}: forward pass failed: {exc}") from exc
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        harm = probs[:, self.harm_index]
        scores = harm.max(dim=-1).values if self.multi_label else harm.sum(dim=-1)
        return [
            Verdict(
                score=float(min(1.0, max(0.0, score))),
                categories={self.labels[i]: float(row[i]) for i in self.harm_index},
                classifier_id=self.classifier_id,
            )
            for score, row in zip(scores.tolist(), probs.tolist())
        ]
