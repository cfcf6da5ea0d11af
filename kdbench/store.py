"""The results store: one SQLite row per cell, written atomically, read back for resume.

Each cell is written in its own transaction, so a run killed at any moment leaves every
finished cell intact and the rerun only does what is missing. WAL mode lets readers (a
leaderboard) work while a run writes, and a busy timeout makes concurrent writers wait
rather than fail with "database is locked".

Several runs may share one store (two terminals, or a workstation and a cluster job): a run
*claims* a cell in a transaction before it starts it, so no cell runs twice. A claim belongs
to one run (host, pid, a random tag) and is kept alive by a heartbeat; the claim of a run
that died (its pid is gone on this host, or its heartbeat is older than ``STALE_SECONDS``)
is taken over by the next run that wants the cell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import KdbenchError

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
CLAIMS = """
CREATE TABLE IF NOT EXISTS claims (
    cell_id     TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,          -- host:pid:tag of the run that works on the cell
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    heartbeat   REAL NOT NULL           -- unix time the owner last said it is alive
);
"""
JSON_COLUMNS = ("metrics", "config", "stages", "environment")
STALE_SECONDS = 300.0  # a claim whose owner has not beaten for this long is abandoned
HEARTBEAT_SECONDS = 30.0


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA busy_timeout=60000")
    return db


SQLITE_HEADER = b"SQLite format 3\x00"
#: The columns a kdbench store's ``cells`` table has had since its first version.
CELL_COLUMNS = {"cell_id", "experiment", "role", "task", "teacher", "student", "recipe", "seed",
                "status", "metrics", "config", "stages", "environment", "started_at", "finished_at"}


class NotAStore(KdbenchError):
    """A path given as a store holds something else (another database, any other file)."""


def _not_a_store(path: Path, what: str) -> NotAStore:
    return NotAStore(f"{path} is not a kdbench results store ({what}); pass --store with a file "
                     "written by 'kdbench run', or a new path for a new store")


def check_store_file(path: Path) -> None:
    """Raise ``NotAStore`` unless ``path`` is missing, empty, or an SQLite database. Reads the
    file's first bytes only: nothing is written."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as file:
        if file.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise _not_a_store(path, "not an SQLite database")


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_store_file(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path)
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "cells" not in tables:
                raise _not_a_store(self.path, f"an SQLite database with other tables: {', '.join(sorted(tables))}")
            if "cells" in tables:
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(cells)")}
                if not CELL_COLUMNS <= columns:
                    raise _not_a_store(self.path, "its 'cells' table lacks "
                                       + ", ".join(sorted(CELL_COLUMNS - columns)))
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA + CLAIMS)
        except sqlite3.DatabaseError as exc:  # a damaged file with an SQLite header
            self._db.close()
            raise _not_a_store(self.path, f"SQLite cannot read it: {exc}") from None
        except NotAStore:
            self._db.close()
            raise
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._beating: threading.Event | None = None
        self._claimed = False  # only a store this run claimed in has claims to give back

    def close(self) -> None:
        self.stop_heartbeat()
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
        with self._db:  # one transaction per cell: the row and the end of its claim
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(f"INSERT OR REPLACE INTO cells ({cols}) VALUES ({marks})", row)
            self._db.execute("DELETE FROM claims WHERE cell_id = ?", (record.cell_id,))

    # ------------------------------------------------------------ claims
    def claim(self, cell_id: str, statuses: tuple[str | None, ...] = (None,)) -> bool:
        """Take ``cell_id`` for this run if its stored status is one of ``statuses`` (None: no
        row yet) and no live run holds it; atomic against every other process."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT status FROM cells WHERE cell_id = ?", (cell_id,)).fetchone()
            if (row[0] if row else None) not in statuses:
                return False
            holder = self._db.execute("SELECT owner, host, pid, heartbeat FROM claims WHERE cell_id = ?",
                                      (cell_id,)).fetchone()
            if holder and holder[0] != self.owner and self._alive(*holder[1:]):
                return False
            self._claimed = True
            self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                             (cell_id, self.owner, socket.gethostname(), os.getpid(), time.time()))
        return True

    def release(self, cell_id: str) -> None:
        """Give a claimed cell back without a result (it was never started)."""
        with self._db:
            self._db.execute("DELETE FROM claims WHERE cell_id = ? AND owner = ?", (cell_id, self.owner))

    def claimed_elsewhere(self) -> dict[str, str]:
        """Cells that another live run is working on, with that run's owner tag."""
        rows = self._db.execute("SELECT cell_id, owner, host, pid, heartbeat FROM claims").fetchall()
        return {cell: owner for cell, owner, *holder in rows
                if owner != self.owner and self._alive(*holder)}

    @staticmethod
    def _alive(host: str, pid: int, heartbeat: float) -> bool:
        if time.time() - heartbeat > STALE_SECONDS:
            return False
        return host != socket.gethostname() or _pid_alive(pid)

    def start_heartbeat(self, every: float = HEARTBEAT_SECONDS) -> None:
        """Refresh this run's claims in the background (its own connection: a cell can run
        for hours without touching the store)."""
        if self._beating is not None:
            return
        self._beating = stop = threading.Event()

        def beat():
            db = _connect(self.path)
            try:
                while not stop.wait(every):
                    with db:
                        db.execute("UPDATE claims SET heartbeat = ? WHERE owner = ?", (time.time(), self.owner))
            finally:
                db.close()

        threading.Thread(target=beat, name="kdbench-heartbeat", daemon=True).start()

    def stop_heartbeat(self) -> None:
        if self._beating is not None:
            self._beating.set()
            self._beating = None
        if self._claimed:  # claims of cells this run did not finish go back at once
            with self._db:
                self._db.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))

    def statuses(self) -> dict[str, str]:
        """Stored status ('done' or 'failed') by cell id."""
        return dict(self._db.execute("SELECT cell_id, status FROM cells"))

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
