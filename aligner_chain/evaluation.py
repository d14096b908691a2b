"""Evaluate a pipeline on a labelled set: what it flags, what it changes, and what it costs.

Every claim about harm and over-correction should be checkable by a user on their own data:
this runs the real :class:`~aligner_chain.AlignerRunnable` (classify, route, correct) over a
JSONL/CSV file and summarises the decision records. "Harmful after" is judged by classifying the
final answers again with the pipeline's own classifier, so it measures what the step achieved by
its own standard (not an independent judge: say so when quoting it).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from aligner_chain.errors import ConfigurationError, InputError
from aligner_chain.record import DecisionRecord
from aligner_chain.routing import RoutingPolicy
from aligner_chain.training.data import json_objects
from aligner_chain.types import QAPair

_LABELS = {
    "1": 1, "true": 1, "yes": 1, "harmful": 1, "unsafe": 1,
    "0": 0, "false": 0, "no": 0, "safe": 0, "harmless": 0,
}  # fmt: skip


class PipelineConfig(BaseModel):
    """``PIPELINE.yaml``: which classifier, corrector, template and policy to evaluate.

    ``classifier``: ``embedded``, ``none`` (correct everything, the paper's setting) or a
    sequence-classifier folder / hub id. ``corrector``: ``mini`` or a causal-LM folder / hub id.
    ``policy``: the policy inline, or the path of a policy file (relative to this file).
    """

    model_config = ConfigDict(extra="forbid")

    classifier: str = "embedded"
    corrector: str = "mini"
    template: str | None = None
    policy: dict[str, Any] | str | None = None
    batch_size: int = Field(default=8, ge=1)

    @classmethod
    def load(cls, path: str | Path) -> tuple[PipelineConfig, RoutingPolicy]:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            config = cls.model_validate(data)
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"{path}: cannot read the pipeline file ({exc})") from exc
        except ValidationError as exc:
            raise ConfigurationError(f"{path}: {exc.errors()[0]['msg']}") from exc
        if isinstance(config.policy, str):
            policy = RoutingPolicy.load(path.parent / config.policy)
        else:
            try:
                policy = RoutingPolicy.model_validate(config.policy or {})
            except ValidationError as exc:
                raise ConfigurationError(f"{path}: policy: {exc.errors()[0]['msg']}") from exc
        return config, policy

    def build(self, policy: RoutingPolicy) -> Any:
        """The runnable this file describes (models load here)."""
        from aligner_chain.classifiers.sequence import SequenceClassifier
        from aligner_chain.correctors.transformers import TransformersCorrector
        from aligner_chain.defaults import default_classifier, default_corrector
        from aligner_chain.runnable import AlignerRunnable

        classifier = None
        if self.classifier == "none":
            policy = policy.model_copy(update={"mode": "always"})
        elif self.classifier == "embedded":
            classifier = default_classifier()
        else:
            classifier = SequenceClassifier(self.classifier)
        corrector = (
            default_corrector()
            if self.corrector == "mini"
            else TransformersCorrector(self.corrector, template=self.template)
        )
        return AlignerRunnable(classifier=classifier, corrector=corrector, policy=policy)


@dataclass(frozen=True, slots=True)
class LabelledPair:
    question: str
    answer: str
    label: int | None  # 1 harmful, 0 safe, None unlabelled


def read_labelled(path: str | Path) -> list[LabelledPair]:
    """question/answer/optional label rows from JSONL, a JSON list or CSV; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: evaluation data not found")
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = [(f"{path}:{reader.line_num}", row) for row in reader]
    else:
        rows = list(json_objects(path))
    pairs = [labelled_pair(row, where) for where, row in rows]
    if not pairs:
        raise InputError(f"{path}: no rows to evaluate")
    return pairs


def labelled_pair(row: Any, where: str) -> LabelledPair:
    """One row as a :class:`LabelledPair` (shared with calibration); errors name ``where``."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with question and answer")
    for name in ("question", "answer"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise InputError(f"{where}: missing or empty field {name!r}")
    raw = row.get("label")
    if raw is None or raw == "":
        return LabelledPair(row["question"], row["answer"], None)
    label = _LABELS.get(str(raw).strip().lower())
    if label is None:
        raise InputError(f"{where}: label {raw!r} is not one of 0/1, safe/harmful, true/false")
    return LabelledPair(row["question"], row["answer"], label)


def run_pipeline(
    step: Any, pairs: Sequence[LabelledPair], *, batch_size: int = 8, progress: bool = True
) -> list[DecisionRecord]:
    """The decision record of every pair, in order (batched like production traffic)."""
    records: list[DecisionRecord] = []
    with tqdm(total=len(pairs), disable=not progress, unit="pair", desc="eval") as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            messages = step.batch([{"question": p.question, "answer": p.answer} for p in chunk])
            records += [
                DecisionRecord.model_validate(m.response_metadata["aligner"]) for m in messages
            ]
            bar.update(len(chunk))
    return records


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def summarise(
    pairs: Sequence[LabelledPair],
    records: Sequence[DecisionRecord],
    flagged_after: Sequence[bool] | None,
    policy: RoutingPolicy,
) -> dict[str, Any]:
    """The JSON summary: routes, harm before/after, over-correction, latency per route."""
    flagged_before = [
        r.verdict_before is not None and policy.is_flagged(r.verdict_before) for r in records
    ]
    changed = [r.final_answer != p.answer for p, r in zip(pairs, records)]
    safe = [i for i, p in enumerate(pairs) if p.label == 0]
    harmful = [i for i, p in enumerate(pairs) if p.label == 1]
    latency: dict[str, list[float]] = defaultdict(list)
    for r in records:
        latency[r.route.value].append(sum(r.timings_ms.values()))
    summary: dict[str, Any] = {
        "pairs": len(pairs),
        "labelled": {"harmful": len(harmful), "safe": len(safe)},
        "routes": dict(Counter(r.route.value for r in records)),
        "flagged_before_rate": _rate(flagged_before),
        "flagged_after_rate": _rate(flagged_after) if flagged_after is not None else None,
        "changed_rate": _rate(changed),
        "over_correction_rate": _rate([changed[i] for i in safe]),
        "harmful_changed_rate": _rate([changed[i] for i in harmful]),
        "harmful_flagged_before_rate": _rate([flagged_before[i] for i in harmful]),
        "harmful_flagged_after_rate": (
            _rate([flagged_after[i] for i in harmful]) if flagged_after is not None else None
        ),
        "safe_flagged_rate": _rate([flagged_before[i] for i in safe]),
        "errors": sum(bool(r.errors) for r in records),
        "latency_ms": {
            route: {
                "n": len(values),
                "mean": statistics.fmean(values),
                "p50": statistics.median(values),
                "p95": sorted(values)[min(len(values) - 1, int(0.95 * len(values)))],
            }
            for route, values in sorted(latency.items())
        },
    }
    return summary


def evaluate(
    config_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pipeline over the data; write ``summary.json``, ``records.jsonl`` and
    ``report.html`` (self-contained: plots are embedded) into ``out_dir``."""
    config, policy = PipelineConfig.load(config_path)
    pairs = read_labelled(data_path)
    step = config.build(policy)
    records = run_pipeline(step, pairs, batch_size=config.batch_size, progress=progress)
    flagged_after = None
    if step.classifier is not None:
        verdicts = step.classifier.classify(
            [QAPair(p.question, r.final_answer or " ") for p, r in zip(pairs, records)]
        )
        flagged_after = [policy.is_flagged(v) for v in verdicts]
    summary = summarise(pairs, records, flagged_after, step.policy)
    summary["pipeline"] = config.model_dump() | {"policy": step.policy.model_dump(mode="json")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with open(out / "records.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(r.model_dump_json() + "\n")
    (out / "report.html").write_text(render_html(summary, pairs, records), encoding="utf-8")
    return summary


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def render_html(
    summary: dict[str, Any], pairs: Sequence[LabelledPair], records: Sequence[DecisionRecord]
) -> str:
    """One HTML file with the summary tables and four plots (matplotlib, embedded as PNG)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigurationError(
            "the HTML report needs matplotlib: pip install 'aligner-chain[report]'"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: list[str] = []
    fig, ax = plt.subplots(figsize=(6, 3))
    names = {1: "harmful", 0: "safe", None: "unlabelled"}
    for label in (0, 1, None):
        scores = [r.score_before for p, r in zip(pairs, records) if p.label == label]
        scores = [s for s in scores if s is not None]
        if scores:
            ax.hist(scores, bins=20, range=(0, 1), alpha=0.6, label=names[label])
    ax.set(title="classifier score by label", xlabel="score before", ylabel="pairs")
    ax.legend()
    figures.append(_png(fig))
    fig, ax = plt.subplots(figsize=(6, 3))
    routes = summary["routes"]
    ax.bar(list(routes), list(routes.values()))
    ax.set(title="routes", ylabel="pairs")
    figures.append(_png(fig))
    fig, ax = plt.subplots(figsize=(6, 3))
    bars = {
        "harmful flagged before": summary["harmful_flagged_before_rate"],
        "harmful flagged after": summary["harmful_flagged_after_rate"],
        "safe answers changed": summary["over_correction_rate"],
    }
    shown = {k: v for k, v in bars.items() if v is not None}
    ax.bar(list(shown), [100 * v for v in shown.values()])
    ax.set(title="harm and over-correction", ylabel="%")
    figures.append(_png(fig))
    fig, ax = plt.subplots(figsize=(6, 3))
    latency = summary["latency_ms"]
    ax.bar(list(latency), [v["p50"] for v in latency.values()], label="p50")
    ax.scatter(list(latency), [v["p95"] for v in latency.values()], color="k", label="p95")
    ax.set(title="latency per route", ylabel="ms")
    ax.legend()
    figures.append(_png(fig))
    plt.close("all")
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>"
        for k, v in summary.items()
        if k != "pipeline"
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>aligner-chain evaluation</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "td{border-bottom:1px solid #ddd;padding:2px 8px;font-family:monospace}</style>"
        "<h1>aligner-chain evaluation</h1>"
        f"<p>{summary['pairs']} pairs. 'Flagged after' re-classifies the final answers with the "
        "pipeline's own classifier.</p>"
        f"<table>{rows}</table>{''.join(figures)}"
        f"<h2>pipeline</h2><pre>{html.escape(json.dumps(summary['pipeline'], indent=2))}</pre>"
    )
