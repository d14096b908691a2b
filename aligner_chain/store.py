"""The correction log: every decision the step makes, kept in a SQLite file.

Corrections are training data (the Aligner paper's bootstrapping: corrected answers become
preferences for the upstream model), so the log is durable first: WAL journal, one transaction
per batch, ``synchronous=FULL``, so a crash loses at most the batch being written. The file is
stamped with an application id and a schema version, so a foreign or corrupt file is refused
with an error naming it instead of being written into.

Logs hold users' questions and the models' answers verbatim: treat the file as personal data.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from pydantic import ValidationError

from aligner_chain.errors import InputError
from aligner_chain.record import DecisionRecord, Route

SCHEMA_VERSION = 1
APPLICATION_ID = 0x416C4368  # "AlCh": marks a file as an aligner-chain correction store
METADATA_KEY = "aligner"
_PAGE = 500  # where the step puts its record in AIMessage.response_metadata

_SCHEMA = """
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record_key TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    route TEXT NOT NULL,
    initial_route TEXT NOT NULL,
    mode TEXT NOT NULL,
    question TEXT NOT NULL,
    original_answer TEXT NOT NULL,
    corrected_answer TEXT,
    final_answer TEXT NOT NULL,
    changed INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    score_before REAL,
    score_after REAL,
    verdict_before TEXT,
    verdict_after TEXT,
    classifier_id TEXT,
    corrector_id TEXT,
    record TEXT NOT NULL
);
CREATE INDEX decisions_created_at ON decisions (created_at);
CREATE INDEX decisions_route ON decisions (route, created_at);
CREATE INDEX decisions_corrector ON decisions (corrector_id);
"""

_COLUMNS = (
    "record_key",
    "created_at",
    "recorded_at",
    "route",
    "initial_route",
    "mode",
    "question",
    "original_answer",
    "corrected_answer",
    "final_answer",
    "changed",
    "truncated",
    "score_before",
    "score_after",
    "verdict_before",
    "verdict_after",
    "classifier_id",
    "corrector_id",
    "record",
)
_INSERT = (
    f"INSERT OR IGNORE INTO decisions ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_COLUMNS))})"
)


class StoreError(InputError):
    """The file is not a usable correction store: corrupt, another application's, or newer."""


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """One logged decision: its row id, when it was written, and the full record."""

    id: int
    recorded_at: str
    record: DecisionRecord


def record_key(record: DecisionRecord) -> str:
    """A content hash: the same decision seen twice (e.g. at every level of a nested chain, or
    again in a graph's full message history) is stored once."""
    canonical = json.dumps(record.to_metadata(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _as_record(item: DecisionRecord | Mapping[str, Any]) -> DecisionRecord:
    if isinstance(item, DecisionRecord):
        return item
    try:
        return DecisionRecord.model_validate(item)
    except ValidationError as exc:
        raise InputError(f"not a decision record: {exc.errors()[0]['msg']}") from exc


def _row(record: DecisionRecord, recorded_at: str) -> tuple[Any, ...]:
    def verdict(v: Any) -> str | None:
        return None if v is None else v.model_dump_json()

    return (
        record_key(record),
        record.created_at,
        recorded_at,
        record.route.value,
        record.initial_route.value,
        record.mode,
        record.question,
        record.original_answer,
        record.corrected_answer,
        record.final_answer,
        int(record.changed),
        int(record.truncated),
        record.score_before,
        record.score_after,
        verdict(record.verdict_before),
        verdict(record.verdict_after),
        record.classifier_id,
        record.corrector_id,
        record.model_dump_json(),
    )


class CorrectionStore:
    """A SQLite log of decision records, safe to share between threads and processes.

    Pass ``store.record`` as the step's recorder, or attach :meth:`callback` to any chain.
    Recording is idempotent: a record already in the file is not stored again.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder, not a correction store file")
        if not self.path.parent.is_dir():
            raise StoreError(f"{self.path}: folder {self.path.parent} does not exist")
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"{self.path}: not a readable SQLite database ({exc})") from exc
        except StoreError:
            self._conn.close()
            raise

    def _open(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")  # two processes creating the schema at once: one wins
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            if app_id == 0 and not tables:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif app_id != APPLICATION_ID:
                raise StoreError(
                    f"{self.path}: an SQLite database of another application "
                    f"(tables: {', '.join(sorted(tables)) or 'none'}), not a correction store"
                )
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: written by a newer aligner-chain (schema {version}, "
                    f"this version reads up to {SCHEMA_VERSION})"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- writing -----------------------------------------------------------------------------

    def record(self, records: Iterable[DecisionRecord | Mapping[str, Any]]) -> int:
        """Store a batch in one transaction; return how many were new."""
        recorded_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        rows = [_row(_as_record(r), recorded_at) for r in records]
        if not rows:
            return 0
        with self._using() as conn:
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return conn.total_changes - before

    def callback(self) -> CorrectionRecorder:
        """A LangChain callback handler that records every decision a run produces."""
        return CorrectionRecorder(self)

    # -- reading -----------------------------------------------------------------------------

    def decisions(
        self,
        *,
        route: Route | str | None = None,
        changed: bool | None = None,
        since: str | None = None,
        until: str | None = None,
        corrector_id: str | None = None,
        limit: int | None = None,
    ) -> Iterator[StoredDecision]:
        """Stored decisions in recording order, filtered; ``since``/``until`` are ISO-8601 UTC
        timestamps compared with the record's ``created_at``."""
        clauses, params = self._filters(route, changed, since, until, corrector_id)
        where = " AND ".join(["id > ?", *clauses])
        sql = f"SELECT id, recorded_at, record FROM decisions WHERE {where} ORDER BY id LIMIT ?"
        last, left = 0, limit
        while left is None or left > 0:
            # Pages by id, so a large log is never held in memory and the lock is not held
            # while the caller works on a row.
            page = _PAGE if left is None else min(_PAGE, left)
            with self._using() as conn:
                rows = conn.execute(sql, [last, *params, page]).fetchall()
            for row_id, recorded_at, raw in rows:
                yield StoredDecision(row_id, recorded_at, DecisionRecord.model_validate_json(raw))
            if len(rows) < page:
                return
            last = rows[-1][0]
            left = None if left is None else left - len(rows)

    def count(
        self,
        *,
        route: Route | str | None = None,
        changed: bool | None = None,
        since: str | None = None,
        until: str | None = None,
        corrector_id: str | None = None,
    ) -> int:
        clauses, params = self._filters(route, changed, since, until, corrector_id)
        where = " AND ".join(clauses) or "1"
        with self._using() as conn:
            return conn.execute(f"SELECT count(*) FROM decisions WHERE {where}", params).fetchone()[
                0
            ]

    def __len__(self) -> int:
        return self.count()

    def __iter__(self) -> Iterator[StoredDecision]:
        return self.decisions()

    @staticmethod
    def _filters(
        route: Route | str | None,
        changed: bool | None,
        since: str | None,
        until: str | None,
        corrector_id: str | None,
    ) -> tuple[list[str], list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("route = ?", Route(route).value if route is not None else None),
            ("changed = ?", None if changed is None else int(changed)),
            ("created_at >= ?", since),
            ("created_at < ?", until),
            ("corrector_id = ?", corrector_id),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return clauses, params

    def integrity_check(self) -> list[str]:
        """SQLite's full consistency check: ``["ok"]`` for a sound file."""
        with self._using() as conn:
            return [r[0] for r in conn.execute("PRAGMA integrity_check")]

    # -- lifecycle ---------------------------------------------------------------------------

    @contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        """Serialise use of the connection and name the file when SQLite finds damage mid-use."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path}: database is damaged ({exc})") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> CorrectionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_records(value: Any) -> Iterator[DecisionRecord]:
    """Decision records carried by messages anywhere in a chain's or graph's output."""
    if isinstance(value, BaseMessage):
        meta = getattr(value, "response_metadata", None) or {}
        found = meta.get(METADATA_KEY)
        if isinstance(found, DecisionRecord):
            yield found
        elif isinstance(found, Mapping):
            try:
                yield DecisionRecord.model_validate(found)
            except ValidationError:
                return
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from find_records(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from find_records(item)


class CorrectionRecorder(BaseCallbackHandler):
    """Records the decisions found in chain outputs (``AIMessage.response_metadata["aligner"]``).

    ``on_chain_end`` fires at every level of a nested chain and a graph returns its whole message
    history, so the same record is seen many times: a bounded memory of recent keys skips them
    before touching the file, and the store's unique key catches the rest.
    """

    def __init__(self, store: CorrectionStore, *, memory: int = 10_000) -> None:
        self.store = store
        self.memory = memory
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def on_chain_end(
        self,
        outputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        fresh: list[DecisionRecord] = []
        with self._lock:
            for record in find_records(outputs):
                key = record_key(record)
                if key in self._seen:
                    continue
                self._seen[key] = None
                if len(self._seen) > self.memory:
                    self._seen.popitem(last=False)
                fresh.append(record)
        if fresh:
            self.store.record(fresh)
