"""Learning-loop data: Q-A-C examples read from JSONL or a correction log, and exports.

Three export formats, all JSONL:

- ``dpo``: ``{"prompt", "chosen", "rejected"}`` with chosen = the accepted correction and
  rejected = the upstream's original answer (the paper's bootstrapping of the upstream model);
  the standard preference format of TRL's ``DPOTrainer``.
- ``sft``: ``{"prompt", "completion"}``, TRL's prompt-completion format, with the corrections.
- ``qac``: ``{"question", "answer", "correction"}``, what ``aligner-chain train`` reads. Answers the
  step judged safe and left alone are kept as copies (answer = correction): the paper keeps
  conforming answers unchanged, and a corrector that never sees them learns to rewrite everything.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from aligner_chain.errors import InputError
from aligner_chain.record import DecisionRecord, Route

ExportFormat = Literal["dpo", "sft", "qac"]
FORMATS: tuple[ExportFormat, ...] = ("dpo", "sft", "qac")
QAC_FIELDS = ("question", "answer", "correction")
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True, slots=True)
class QACExample:
    """One training example: the corrector should turn ``answer`` into ``correction``."""

    question: str
    answer: str
    correction: str


def accepted_correction(record: DecisionRecord) -> str | None:
    """The correction the policy accepted and showed, or None.

    Corrections that were rejected (the route fell back to refuse or re-ask), empty, identical to
    the answer, or made from a truncated input are not training signal.
    """
    corrected = (record.corrected_answer or "").strip()
    if (
        record.route is not Route.CORRECT
        or record.truncated
        or not corrected
        or corrected == record.original_answer.strip()
    ):
        return None
    return record.corrected_answer


def export_row(record: DecisionRecord, fmt: ExportFormat) -> dict[str, str] | None:
    """One record in an export format, or None when it carries nothing for that format."""
    corrected = accepted_correction(record)
    question, answer = record.question, record.original_answer
    if fmt == "qac":
        if corrected is None and record.route is Route.SKIP and not record.truncated:
            return asdict(QACExample(question, answer, answer))
        return None if corrected is None else asdict(QACExample(question, answer, corrected))
    if corrected is None:
        return None
    if fmt == "dpo":
        return {"prompt": question, "chosen": corrected, "rejected": answer}
    if fmt == "sft":
        return {"prompt": question, "completion": corrected}
    raise InputError(f"unknown export format {fmt!r} ({', '.join(FORMATS)})")


def write_jsonl(rows: Iterable[dict[str, Any]], out: str | Path) -> int:
    """Write rows atomically (a temporary file renamed into place); return how many."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or ".")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def is_store(path: str | Path) -> bool:
    """Whether a file is an SQLite database (a correction log) rather than JSON text."""
    with open(path, "rb") as fh:
        return fh.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC


def read_qac(path: str | Path) -> list[QACExample]:
    """Q-A-C examples from a JSONL file, a JSON list (the Aligner repo's template format) or a
    correction log. Errors name the file and line; an empty dataset is an error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: training data not found")
    if is_store(path):
        from aligner_chain.store import CorrectionStore

        with CorrectionStore(path) as store:
            examples = [
                QACExample(**row)
                for stored in store
                if (row := export_row(stored.record, "qac")) is not None
            ]
    else:
        examples = [_example(obj, where) for where, obj in json_objects(path)]
    if not examples:
        raise InputError(f"{path}: no training examples")
    return examples


def json_objects(path: Path) -> Iterator[tuple[str, Any]]:
    """Objects with where they were found: ``file:line`` (JSONL) or ``file[index]`` (a list)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(items, list):
            raise InputError(f"{path}: expected a JSON list of objects")
        yield from ((f"{path}[{i}]", item) for i, item in enumerate(items))
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc


def _example(obj: Any, where: str) -> QACExample:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [name for name in QAC_FIELDS if name not in obj]
    if missing:
        raise InputError(f"{where}: missing field {', '.join(map(repr, missing))}")
    for name in QAC_FIELDS:
        if not isinstance(obj[name], str):
            raise InputError(f"{where}: field {name!r} must be a string")
    if not obj["answer"].strip() or not obj["correction"].strip():
        raise InputError(f"{where}: empty answer or correction")
    return QACExample(obj["question"], obj["answer"], obj["correction"])
