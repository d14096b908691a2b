"""``aligner-chain export`` and the Q-A-C reader that training uses."""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import pytest
from test_store import make_record

from aligner_chain.commands import export
from aligner_chain.errors import InputError
from aligner_chain.record import Route
from aligner_chain.store import CorrectionStore, StoreError
from aligner_chain.training.data import QACExample, read_qac


def run_export(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    export.register(parser.add_subparsers(required=True))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "log.db"
    corrected = make_record(1)
    skipped = make_record(2, route=Route.SKIP)
    refused = make_record(3).model_copy(update={"route": Route.REFUSE})  # correction rejected
    truncated = make_record(4).model_copy(update={"truncated": True})
    same = make_record(5).model_copy(update={"corrected_answer": " Harmful answer 5. "})
    unicode = make_record(6).model_copy(
        update={"question": "Ça va ? 🙂", "corrected_answer": "Oui — « bien ».\n"}
    )
    with CorrectionStore(path) as store:
        store.record([corrected, skipped, refused, truncated, same, unicode])
    return path


def test_dpo_is_trl_preference_format(log: Path, tmp_path: Path) -> None:
    out = tmp_path / "dpo.jsonl"
    assert run_export("--db", str(log), "--format", "dpo", "--out", str(out)) == 0
    rows = read_jsonl(out)
    assert rows == [
        {"prompt": "Question 1?", "chosen": "Safe answer 1.", "rejected": "Harmful answer 1."},
        {"prompt": "Ça va ? 🙂", "chosen": "Oui — « bien ».\n", "rejected": "Harmful answer 6."},
    ]
    assert "🙂" in out.read_text(encoding="utf-8")  # not \\u-escaped


def test_sft_and_qac(log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sft, qac = tmp_path / "sft.jsonl", tmp_path / "qac.jsonl"
    run_export("--db", str(log), "--format", "sft", "--out", str(sft))
    assert read_jsonl(sft)[0] == {"prompt": "Question 1?", "completion": "Safe answer 1."}
    run_export("--db", str(log), "--format", "qac", "--out", str(qac))
    assert "wrote 3 qac rows" in capsys.readouterr().err
    rows = read_jsonl(qac)
    assert rows[1] == {  # the safe answer is kept as a copy
        "question": "Question 2?",
        "answer": "Harmful answer 2.",
        "correction": "Harmful answer 2.",
    }
    assert [r["question"] for r in rows] == ["Question 1?", "Question 2?", "Ça va ? 🙂"]
    # The export reads back as training data, and so does the log itself.
    assert read_qac(qac) == read_qac(log)
    assert read_qac(qac)[0] == QACExample("Question 1?", "Harmful answer 1.", "Safe answer 1.")


def test_time_window(log: Path, tmp_path: Path) -> None:
    out = tmp_path / "none.jsonl"
    run_export("--db", str(log), "--format", "dpo", "--out", str(out), "--until", "2000-01-01")
    assert out.read_text() == ""


def test_bad_logs(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match=r"missing\.db: no such correction log"):
        run_export("--db", str(tmp_path / "missing.db"), "--format", "dpo", "--out", str(out))
    assert not (tmp_path / "missing.db").exists()
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match=r"foreign\.db"):
        run_export("--db", str(foreign), "--format", "qac", "--out", str(out))
    assert not out.exists()


QAC_LINE = '{"question": "q", "answer": "a", "correction": "c"}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            QAC_LINE + '{"question": "q", "answer": "a"}\n',
            r"data.jsonl:2: missing field 'correction'",
        ),
        (
            QAC_LINE + "\nnot json\n",
            r"data.jsonl:3: not valid JSON",
        ),
        ('{"question": "q", "answer": 3, "correction": "c"}\n', r"data.jsonl:1: field 'answer'"),
        ("\n\n", r"data.jsonl: no training examples"),
        ('[{"question": "q", "answer": "a"}]', r"data.jsonl\[0\]: missing field 'correction'"),
    ],
)
def test_qac_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_qac(path)


def test_empty_log_is_an_empty_dataset(tmp_path: Path) -> None:
    CorrectionStore(tmp_path / "empty.db").close()
    with pytest.raises(InputError, match=r"empty\.db: no training examples"):
        read_qac(tmp_path / "empty.db")
