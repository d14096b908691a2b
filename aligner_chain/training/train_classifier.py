"""Fine-tune the embedded classifier end to end, calibrate it, pick bands, and evaluate it.

Recipe (why): a frozen MiniLM embedding with a logistic head reaches only ~0.72 AUROC on
held-out response sets, so the whole encoder is trained (word embeddings stay frozen, which keeps
the shipped delta small and costs little). One multi-task head: a harm logit (BCE on labelled
pairs, plus a pairwise ranking loss on hh-rlhf chosen/rejected, whose labels are only relative)
and eight moderation-category logits (BCE where the label is known). Probabilities are
Platt-calibrated on the validation split with the int8 fast path that ships, and routing bands
are read off the same split. Every source is then scored on its held-out test split.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aligner_chain.classifiers.embedded import (
    BASE_HUB_ID,
    CATEGORIES,
    CONFIG_FILE,
    EmbeddedClassifier,
    HarmModel,
    PairEncoder,
    Platt,
    Windowing,
    embedding_fingerprint,
    load_base,
    save_classifier,
    write_classifier_config,
)
from aligner_chain.errors import ConfigurationError
from aligner_chain.training.classifier_data import SOURCES, Example, Mix, build_mix
from aligner_chain.types import QAPair

logger = logging.getLogger(__name__)

FPR_TARGET = 0.05
"""correct_at keeps the false-positive rate on harmless answers within this, with confidence."""
FPR_CONFIDENCE_Z = 1.645
"""One-sided 95 %: correct_at bounds the *upper* Wilson limit of the validation FPR, so that
the target holds on unseen data too, not just on the validation sample (the plain validation
rate, 4.89 % for the third-round weights, came out at 5.55 % on the test splits)."""
PRECISION_REASK, PRECISION_REFUSE = 0.95, 0.99
"""reask_at / refuse_at are the lowest scores whose validation precision reaches these."""


@dataclass
class TrainSettings:
    """Everything that determines the result; stored in the output config."""

    epochs: int = 2
    max_length: int = 96
    question_tokens: int = 32
    overlap: int = 24
    batch_size: int = 16
    lr: float = 8e-5
    weight_decay: float = 0.01
    warmup: float = 0.06
    rank_weight: float = 0.5
    seed: int = 0
    max_train_per_source: int = 1500
    max_eval_per_source: int = 300
    source_weights: dict[str, float] = field(default_factory=lambda: {"diasafety": 4.0})
    """Training-cap weights by source name, over ``classifier_data.SOURCES[name].train_weight``
    (which other callers of ``build_mix`` keep). DiaSafety x 4: its 9,017 training rows are the
    largest human-labelled set of subtle harm; 6,000 of them in the mix raised validation
    accuracy from 0.870 to 0.879 (issue 4, round 3; see the model card)."""

    def check(self) -> None:
        if self.max_length > 512 or self.question_tokens + self.overlap + 8 > self.max_length:
            raise ConfigurationError(
                "need question_tokens + overlap + 8 <= max_length <= 512 (MiniLM positions)"
            )
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigurationError("epochs >= 1 and batch_size >= 2 are required")
        for name, weight in self.source_weights.items():
            if name not in SOURCES or SOURCES[name].use != "train":
                trainable = ", ".join(k for k, v in SOURCES.items() if v.use == "train")
                raise ConfigurationError(f"unknown training source {name!r} (one of: {trainable})")
            if not weight >= 0:
                raise ConfigurationError(f"the weight of {name!r} must be >= 0, got {weight}")


def _batches(
    train: list[Example], size: int, rng: random.Random, lengths: list[int]
) -> list[list[int]]:
    """Length-bucketed batches (less padding on CPU); hh-rlhf pairs stay in one batch."""
    units: dict[str, list[int]] = {}
    for i, ex in enumerate(train):
        units.setdefault(ex.rank_group or f"#{i}", []).append(i)
    keys = list(units)
    rng.shuffle(keys)
    batches: list[list[int]] = []
    span = size * 50
    for start in range(0, len(keys), span):
        bucket = sorted(keys[start : start + span], key=lambda k: max(lengths[i] for i in units[k]))
        batch: list[int] = []
        for key in bucket:
            batch += units[key]
            if len(batch) >= size:
                batches.append(batch)
                batch = []
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def _loss(logits: torch.Tensor, examples: Sequence[Example], rank_weight: float) -> torch.Tensor:
    harm_idx = [i for i, ex in enumerate(examples) if ex.label is not None and not ex.rank_group]
    loss = logits.new_zeros(())
    if harm_idx:
        target = torch.tensor([float(examples[i].label) for i in harm_idx])  # type: ignore[arg-type]
        loss = loss + nn.functional.binary_cross_entropy_with_logits(logits[harm_idx, 0], target)
    cats = torch.tensor(
        [ex.categories if ex.categories else (-1,) * len(CATEGORIES) for ex in examples],
        dtype=torch.float32,
    )
    known = cats >= 0
    if known.any():
        loss = loss + nn.functional.binary_cross_entropy_with_logits(
            logits[:, 1:][known], cats[known]
        )
    pairs: dict[str, dict[int, int]] = {}
    for i, ex in enumerate(examples):
        if ex.rank_group and ex.label is not None:
            pairs.setdefault(ex.rank_group, {})[ex.label] = i
    ranked = [(p[1], p[0]) for p in pairs.values() if len(p) == 2]
    if ranked:
        worse, better = (list(x) for x in zip(*ranked, strict=True))
        margin = logits[worse, 0] - logits[better, 0]
        loss = loss - rank_weight * nn.functional.logsigmoid(margin).mean()
    return loss


def train_model(
    mix: Mix, settings: TrainSettings, base_model: str | None
) -> tuple[HarmModel, PairEncoder]:
    """Fine-tune the encoder and head on ``mix.train``; deterministic for a given seed."""
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    encoder, tokenizer = load_base(base_model)
    model = HarmModel(encoder)
    encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    windowing = Windowing(settings.max_length, settings.question_tokens, settings.overlap)
    pair_encoder = PairEncoder(tokenizer, windowing)
    inputs = [pair_encoder.windows(ex.question, ex.answer, first_only=True)[0] for ex in mix.train]
    rng = random.Random(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay}],
        lr=settings.lr,
        weight_decay=0.0,
    )
    lengths = [len(x) for x in inputs]
    epochs = [
        _batches(mix.train, settings.batch_size, rng, lengths) for _ in range(settings.epochs)
    ]
    total = sum(len(e) for e in epochs)
    warmup = max(1, int(total * settings.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    pad = tokenizer.pad_token_id
    model.train()
    step, started, seen, running = 0, time.monotonic(), 0, 0.0
    for batches in epochs:
        for batch in batches:
            ids, mask = PairEncoder.collate([inputs[i] for i in batch], pad)
            loss = _loss(model(ids, mask), [mix.train[i] for i in batch], settings.rank_weight)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step, seen = step + 1, seen + len(batch)
            value = loss.item()
            running = 0.98 * running + 0.02 * value if step > 1 else value
            if step % 20 == 0 or step == total:
                rate = seen / (time.monotonic() - started)
                logger.info("step %d/%d loss %.4f (%.1f examples/s)", step, total, running, rate)
    model.eval()
    return model, pair_encoder


# -- metrics -------------------------------------------------------------------------------


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN with one class."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not pos or not neg:
        return float("nan")
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        avg = (i + j + 1) / 2  # 1-based average rank of the tie block
        rank_sum += avg * sum(1 for k in range(i, j) if ranked[k][1] == 1)
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def ece(probs: Sequence[float], labels: Sequence[int], bins: int = 15) -> float:
    """Expected calibration error over equal-width probability bins."""
    total, err = len(probs), 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if idx:
            conf = sum(probs[i] for i in idx) / len(idx)
            acc = sum(labels[i] for i in idx) / len(idx)
            err += len(idx) / total * abs(conf - acc)
    return err


def threshold_metrics(probs: Sequence[float], labels: Sequence[int], t: float) -> dict[str, float]:
    tp = sum(1 for p, y in zip(probs, labels, strict=True) if p >= t and y == 1)
    fp = sum(1 for p, y in zip(probs, labels, strict=True) if p >= t and y == 0)
    pos, neg = sum(labels), len(labels) - sum(labels)
    out = {"accuracy": (tp + neg - fp) / len(labels)} if labels else {}
    if neg:
        out["fpr"] = fp / neg
    if pos:
        out["recall"] = tp / pos
        out["f1"] = 2 * tp / (2 * tp + fp + (pos - tp))
    return out


def choose_bands(probs: Sequence[float], labels: Sequence[int]) -> dict[str, float | None]:
    """Bands from validation scores: the decision threshold correct_at, precision bands above it.

    ``correct_at`` is the threshold with the highest validation accuracy among those whose
    validation false-positive rate is within :data:`FPR_TARGET` at its one-sided 95 % upper
    Wilson limit (ties: the lowest such threshold, i.e. the higher recall). Thresholds are
    scanned from the top score down, so each candidate's counts are cumulative. A precision
    band needs at least 20 flagged pairs.
    """
    pos = sum(labels)
    neg = max(1, len(labels) - pos)
    ranked = sorted(zip(probs, labels, strict=True), reverse=True)
    # (threshold, fpr upper limit, precision, accuracy), descending thresholds
    stats: list[tuple[float, float, float, float]] = []
    tp = fp = 0
    for k, (p, y) in enumerate(ranked):
        tp, fp = tp + y, fp + (1 - y)
        if k + 1 == len(ranked) or ranked[k + 1][0] != p:
            precision = tp / (tp + fp) if tp + fp >= 20 else 0.0
            accuracy = (tp + neg - fp) / max(1, len(labels))
            stats.append((p, wilson_upper(fp, neg), precision, accuracy))
    ascending = stats[::-1]
    allowed = [(acc, -t) for t, f, _, acc in ascending if f <= FPR_TARGET]
    correct_at = -max(allowed)[1] if allowed else 1.0
    above = [(t, prec) for t, _, prec, _ in ascending if t >= correct_at]
    reask_at = next((t for t, prec in above if prec >= PRECISION_REASK), None)
    refuse_at = next((t for t, prec in above if prec >= PRECISION_REFUSE), None)
    if reask_at is not None and refuse_at is not None:
        refuse_at = max(refuse_at, reask_at)
    return {"correct_at": _r(correct_at), "reask_at": _r(reask_at), "refuse_at": _r(refuse_at)}


def wilson_upper(k: int, n: int, z: float = FPR_CONFIDENCE_Z) -> float:
    """Upper Wilson score limit of a rate of ``k`` in ``n`` (one-sided at ``z``)."""
    if n <= 0:
        return 1.0
    rate, spread = k / n, z * z / n
    centre = rate + spread / 2
    half = z * math.sqrt(rate * (1 - rate) / n + spread / (4 * n))
    return min(1.0, (centre + half) / (1 + spread))


def _r(x: float | None, digits: int = 3) -> float | None:
    """Rounded for the JSON config; NaN (a metric undefined on one class) becomes null."""
    return None if x is None or math.isnan(x) else round(x, digits)


def _pairs(examples: Sequence[Example]) -> list[QAPair]:
    return [QAPair(ex.question, ex.answer) for ex in examples]


def evaluate(clf: EmbeddedClassifier, mix: Mix, correct_at: float) -> dict[str, Any]:
    """Per-source metrics on each held-out test split, scored through the public ``classify``."""
    verdicts = clf.classify(_pairs(mix.test))
    probs = [v.score for v in verdicts]
    report: dict[str, Any] = {"sources": {}}
    pooled_p: list[float] = []
    pooled_y: list[int] = []
    for source in sorted({ex.source for ex in mix.test}):
        idx = [i for i, ex in enumerate(mix.test) if ex.source == source]
        exs = [mix.test[i] for i in idx]
        row: dict[str, Any] = {"n": len(idx), "licence": SOURCES[source].licence}
        if source == "openai_moderation":
            for k, (code, name) in enumerate(CATEGORIES.items()):
                known = [
                    (verdicts[i].categories[name], ex.categories[k])  # type: ignore[index]
                    for i, ex in zip(idx, exs, strict=True)
                    if ex.categories[k] >= 0  # type: ignore[index]
                ]
                if known:
                    s, y = zip(*known, strict=True)
                    row[f"auroc_{code}"] = _r(auroc(s, y), 4)
                    row[f"positives_{code}"] = sum(y)
            flagged = [max(verdicts[i].categories.values()) for i in idx]
            any_label = [int(any(c == 1 for c in ex.categories or ())) for ex in exs]
            row["f1_any_category_at_0.5"] = _r(threshold_metrics(flagged, any_label, 0.5)["f1"], 4)
        elif source == "hh_rlhf":
            by_group: dict[str, dict[int, float]] = {}
            for i, ex in zip(idx, exs, strict=True):
                by_group.setdefault(ex.rank_group or "", {})[ex.label or 0] = probs[i]
            wins = [g[1] > g[0] for g in by_group.values() if len(g) == 2]
            row["pairwise_accuracy"] = _r(sum(wins) / max(1, len(wins)), 4)
        else:
            p = [probs[i] for i in idx]
            y = [int(ex.label or 0) for ex in exs]
            row["positives"] = sum(y)
            row["auroc"] = _r(auroc(p, y), 4)
            row["ece"] = round(ece(p, y), 4)
            row.update({k: round(v, 4) for k, v in threshold_metrics(p, y, correct_at).items()})
            pooled_p += p
            pooled_y += y
        report["sources"][source] = row
    report["pooled"] = {
        "n": len(pooled_y),
        "auroc": _r(auroc(pooled_p, pooled_y), 4),
        "ece": round(ece(pooled_p, pooled_y), 4),
        **{k: round(v, 4) for k, v in threshold_metrics(pooled_p, pooled_y, correct_at).items()},
    }
    return report


def _labelled(examples: Sequence[Example]) -> list[Example]:
    """Pairs with an absolute harm label (calibration and bands use only these)."""
    return [ex for ex in examples if ex.label is not None and not ex.rank_group]


def calibrate(clf: EmbeddedClassifier, mix: Mix) -> dict[str, Any]:
    """Platt parameters for harm and each category, fitted on the validation split."""
    val = _labelled(mix.val)
    logits, counts = clf.logits(_pairs(val))
    scored = [i for i, n in enumerate(counts) if n]  # empty answers score 0 by definition
    val, logits = [val[i] for i in scored], logits[scored]
    harm = Platt.fit(logits[:, 0], torch.tensor([float(ex.label or 0) for ex in val]))
    cat_val = [ex for ex in mix.val if ex.categories is not None]
    cat_logits, counts = clf.logits(_pairs(cat_val))
    cat_val = [ex for ex, n in zip(cat_val, counts, strict=True) if n]
    cat_logits = cat_logits[[i for i, n in enumerate(counts) if n]]
    categories = {}
    for k, code in enumerate(CATEGORIES):
        rows = [(i, ex.categories[k]) for i, ex in enumerate(cat_val) if ex.categories[k] >= 0]  # type: ignore[index]
        if sum(y for _, y in rows) >= 10:
            idx = [i for i, _ in rows]
            fitted = Platt.fit(cat_logits[idx, k + 1], torch.tensor([float(y) for _, y in rows]))
            categories[code] = asdict(fitted)
    probs = harm(logits[:, 0]).tolist()
    labels = [int(ex.label or 0) for ex in val]
    return {
        "harm": asdict(harm),
        "categories": categories,
        "val_ece": round(ece(probs, labels), 4),
        "val_ece_uncalibrated": round(ece(torch.sigmoid(logits[:, 0]).tolist(), labels), 4),
        "bands": choose_bands(probs, labels),
    }


def _mix(data_dir: Path, settings: TrainSettings) -> Mix:
    mix = build_mix(
        data_dir,
        seed=settings.seed,
        max_train_per_source=settings.max_train_per_source,
        max_eval_per_source=settings.max_eval_per_source,
        train_weights=settings.source_weights,
    )
    logger.info("mix: %d train, %d val, %d test", len(mix.train), len(mix.val), len(mix.test))
    return mix


def run(
    data_dir: Path, out: Path, settings: TrainSettings, base_model: str | None = None
) -> dict[str, Any]:
    """The whole recipe: data mix, training, calibration, bands, held-out evaluation."""
    settings.check()
    started = time.monotonic()
    mix = _mix(data_dir, settings)
    model, pair_encoder = train_model(mix, settings, base_model)
    config: dict[str, Any] = {
        "format": 1,
        "base_model": BASE_HUB_ID,
        "base_embedding_sha256": embedding_fingerprint(
            model.encoder.embeddings.word_embeddings.weight
        ),
        "categories": list(CATEGORIES),
        "windowing": asdict(pair_encoder.windowing),
        "settings": asdict(settings),
        "data": {
            "train": len(mix.train),
            "val": len(mix.val),
            "test": len(mix.test),
            "sources": {k: asdict(v) for k, v in SOURCES.items()},
        },
    }
    save_classifier(out, model, config)
    config = _calibrate_and_evaluate(out, config, mix, base_model)
    config["metrics"]["minutes"] = round((time.monotonic() - started) / 60, 1)
    write_classifier_config(out, config)
    return config


def recalibrate(data_dir: Path, out: Path, base_model: str | None = None) -> dict[str, Any]:
    """Calibration, bands and held-out evaluation again for the weights already in ``out`` (a
    finished run, or the shipped folder), on the data mix of its stored settings: for when the
    rule that chooses the bands changes. The weights are not touched; the stored training time
    is kept."""
    path = out / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
        settings = TrainSettings(**config["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{path}: not the config of a trained classifier ({exc})") from exc
    settings.check()
    minutes = config.get("metrics", {}).get("minutes")
    config = _calibrate_and_evaluate(out, config, _mix(data_dir, settings), base_model)
    config["metrics"]["minutes"] = minutes
    write_classifier_config(out, config)
    return config


def _calibrate_and_evaluate(
    out: Path, config: dict[str, Any], mix: Mix, base_model: str | None
) -> dict[str, Any]:
    """Platt scaling and bands from the validation split (written into the folder's config,
    which the evaluation loads), then the test-split report in ``config["metrics"]``; the
    caller adds the run time and writes the config."""
    cal = calibrate(EmbeddedClassifier(out, base_model=base_model, calibrated=False), mix)
    config.update(
        calibration={"harm": cal["harm"], "categories": cal["categories"]}, bands=cal["bands"]
    )
    write_classifier_config(out, config)
    report = evaluate(
        EmbeddedClassifier(out, base_model=base_model), mix, cal["bands"]["correct_at"] or 1.0
    )
    config["metrics"] = {
        "val_ece": cal["val_ece"],
        "val_ece_uncalibrated": cal["val_ece_uncalibrated"],
        "test": report,
    }
    return config
