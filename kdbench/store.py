"""The results store: one SQLite row per cell, written atomically, read back for resume.

Each cell is written in its own transaction, so a run killed at any moment leaves every
finished cell intact and the rerun only does what is missing. WAL mode lets readers (a
leaderboard) work while a run writes.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    cell_id     TEXT PRIMARY KEY,
    experiment  TEXT NOT NULL,
    role        TEXT NOT NULL,          -- 'teacher' or 'student'
    task        TEXT NOT NULL,
    teacher     TEXT NOT NULL,
    student     TEXT NOT NULL,
    recipe      TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    status      TEXT NOT NULL,          -- 'done' or 'failed'
    metrics     TEXT NOT NULL,          -- JSON: the harness's figures
    config      TEXT NOT NULL,          -- JSON: the full resolved config
    stages      TEXT NOT NULL,          -- JSON: per-stage log (time, history, compressor report)
    environment TEXT NOT NULL,          -- JSON: versions, CPU, threads, git revision
    error       TEXT,
    traceback   TEXT,
    started_at  TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
"""
JSON_COLUMNS = ("metrics", "config", "stages", "environment")


@dataclasses.dataclass
class Record:
    """The outcome of one cell (a student cell or a teacher's own row)."""

    cell_id: str
    experiment: str
    role: str
    task: str
    teacher: str
    student: str
    recipe: str
    seed: int
    status: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    stages: list[dict[str, Any]]
    environment: dict[str, Any]
    started_at: str
    finished_at: str
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done"


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, record: Record) -> None:
        row = dataclasses.asdict(record)
        for col in JSON_COLUMNS:
            row[col] = json.dumps(row[col], sort_keys=True, default=str)
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        with self._db:  # one transaction per cell
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(f"INSERT OR REPLACE INTO cells ({cols}) VALUES ({marks})", row)

    def done_ids(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT cell_id FROM cells WHERE status = 'done'")}

    def records(self, experiment: str | None = None) -> list[Record]:
        query = "SELECT * FROM cells"
        args: tuple = ()
        if experiment is not None:
            query += " WHERE experiment = ?"
            args = (experiment,)
        cursor = self._db.execute(query + " ORDER BY finished_at", args)
        names = [d[0] for d in cursor.description]
        out = []
        for values in cursor:
            row = dict(zip(names, values, strict=True))
            for col in JSON_COLUMNS:
                row[col] = json.loads(row[col])
            out.append(Record(**row))
        return out

    def experiments(self) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT experiment FROM cells GROUP BY experiment ORDER BY MAX(finished_at)")]
