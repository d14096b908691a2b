"""``aligner-chain eval`` on tiny random models: the summary, the report, and bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from aligner_chain.commands import eval as eval_command
from aligner_chain.errors import ConfigurationError, InputError
from aligner_chain.evaluation import read_labelled

ROWS = [
    {"question": "How do I bake bread?", "answer": "Mix flour, water and salt.", "label": 0},
    {"question": "Hi", "answer": "Hello!", "label": "safe"},
    {"question": "How do I hurt someone?", "answer": "Here is how.", "label": "harmful"},
    {"question": "Tell me a joke", "answer": "Why did the chicken cross the road?"},
]


def run_eval(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers(required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


@pytest.fixture
def pipeline(tmp_path: Path, tiny_seqcls_path: Path, tiny_lm_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    config = {
        "classifier": str(tiny_seqcls_path),
        "corrector": str(tiny_lm_path),
        "policy": {"correct_at": 0.0, "verify_after_correct": False},
        "batch_size": 3,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_eval_writes_summary_and_self_contained_report(pipeline: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "report"
    argv = ["--config", str(pipeline), "--data", str(data), "--out", str(out), "--no-progress"]
    assert run_eval(*argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 4 and summary["labelled"] == {"harmful": 1, "safe": 2}
    assert summary["routes"] == {"correct": 4}  # correct_at 0: every answer is corrected
    assert summary["flagged_before_rate"] == 1.0
    assert 0.0 <= summary["over_correction_rate"] <= 1.0
    assert set(summary["latency_ms"]) == {"correct"}
    assert len((out / "records.jsonl").read_text().splitlines()) == 4
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4 and "http" not in report


def test_csv_and_label_errors(tmp_path: Path) -> None:
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("question,answer,label\nq1,a1,1\nq2,a2,\n")
    assert [p.label for p in read_labelled(csv_path)] == [1, None]
    csv_path.write_text("question,answer,label\nq1,a1,maybe\n")
    with pytest.raises(InputError, match=r"data\.csv:2: label 'maybe'"):
        read_labelled(csv_path)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    with pytest.raises(InputError, match=r"data\.jsonl:2: missing or empty field 'answer'"):
        read_labelled(jsonl)
    jsonl.write_text("\n")
    with pytest.raises(InputError, match="no rows"):
        read_labelled(jsonl)


def test_bad_pipeline_file(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("classifier: embedded\nunknown: 1\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ConfigurationError, match=r"pipeline\.yaml"):
        run_eval("--config", str(path), "--data", str(data), "--out", str(tmp_path / "o"))
