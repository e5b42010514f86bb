"""Copy a SQLite store into PostgreSQL (``watchfolder store migrate --to URL``).

Every table the two stores share is copied row by row, keeping ids, with
``ON CONFLICT DO NOTHING``: running it again copies only what is new, and a
row already in the target is never changed. Tables added later by other
features (token usage, file lists…) are copied the same way as long as both
schemas have them. Left out: the litequeue ``dispatch`` table (PostgreSQL
dispatches from the job rows: queued jobs get a place in the line, oldest
first), ``meta`` (each store keeps its own schema version) and
``components`` (live status, republished by the running processes).

Run it with the services stopped. A job that was running is copied as
running; its lease runs out and it is queued again, as after a crash.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .postgres import PostgresStore

#: Not copied (see the module docstring).
SKIPPED_TABLES = {"meta", "dispatch", "components", "sqlite_sequence"}
#: Copied first, in this order (foreign keys point backwards); any other shared table follows.
ORDER = ("jobs", "job_history", "outbox")
BATCH = 1000


def copy_sqlite_to_postgres(sqlite_path: str | Path, target: PostgresStore) -> dict[str, dict[str, int]]:
    """Copy the SQLite store at ``sqlite_path`` into ``target``; returns per table ``{"read", "copied"}``.

    Raises :class:`StoreError` when the file is not a watchfolder store.
    """
    path = Path(sqlite_path)
    if not path.is_file():
        raise StoreError(f"{path} does not exist; give the SQLite store to copy (store.url or store.path)")
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    src.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "jobs" not in tables:
            raise StoreError(f"{path} holds no jobs table; is it a watchfolder store?")
        report: dict[str, dict[str, int]] = {}
        with target._tx(pipeline=False) as conn:
            _refuse_other_jobs(src, conn, path)
            target_columns = _target_columns(conn)
            shared = [t for t in tables - SKIPPED_TABLES if t in target_columns]
            shared.sort(key=lambda t: (ORDER.index(t) if t in ORDER else len(ORDER), t))
            for table in shared:
                report[table] = _copy_table(src, conn, table, target_columns[table])
            # Queued jobs without a place in PostgreSQL's line get one, oldest first.
            conn.execute(
                "UPDATE jobs SET message_id = nextval('dispatch_seq') FROM"
                " (SELECT id FROM jobs WHERE state = 'queued' AND message_id IS NULL ORDER BY id) AS q"
                " WHERE jobs.id = q.id"
            )
            conn.execute("NOTIFY watchfolder_jobs")
            for table in shared:
                if "id" in target_columns[table]:
                    _advance_identity(conn, table)
        return report
    finally:
        src.close()


def _refuse_other_jobs(src: sqlite3.Connection, conn, path: Path) -> None:
    """Raise :class:`StoreError` when the target holds *other* jobs under ids of the source's.

    Ids are kept, and a row already there is left as it is (that makes a second run
    idempotent); copied into a database where other jobs took those ids, the source's
    jobs would be dropped without a word (found by trying it).
    """
    keys = dict(src.execute("SELECT id, idempotency_key FROM jobs"))
    ids = list(keys)
    clashes = []
    for start in range(0, len(ids), BATCH):
        rows = conn.execute(
            "SELECT id, idempotency_key FROM jobs WHERE id = ANY(%s)", (ids[start:start + BATCH],)
        ).fetchall()
        clashes += [r["id"] for r in rows if r["idempotency_key"] != keys[r["id"]]]
    if clashes:
        raise StoreError(
            f"the target database already holds other jobs under {len(clashes)} of the ids in {path} "
            f"(e.g. job {min(clashes)}); nothing was copied. Migrate into an empty database (or the one an "
            "earlier `store migrate` of this same file filled)"
        )


def _target_columns(conn) -> dict[str, dict[str, str]]:
    """Tables of the target with a primary key (others cannot be copied idempotently): column -> data type."""
    rows = conn.execute(
        "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c"
        " WHERE c.table_schema = current_schema() AND EXISTS (SELECT 1 FROM information_schema.table_constraints t"
        " WHERE t.table_schema = c.table_schema AND t.table_name = c.table_name"
        " AND t.constraint_type = 'PRIMARY KEY')"
    ).fetchall()
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        out.setdefault(r["table_name"], {})[r["column_name"]] = r["data_type"]
    return out


def _convert(value: Any, data_type: str) -> Any:
    if value is None:
        return None
    if data_type == "boolean":
        return bool(value)
    if data_type == "bytea":
        return bytes(value)
    return value


def _copy_table(src: sqlite3.Connection, conn, table: str, columns: dict[str, str]) -> dict[str, int]:
    src_columns = [r[1] for r in src.execute(f'PRAGMA table_info("{table}")')]
    names = [c for c in src_columns if c in columns]
    if table == "jobs":
        names = [c for c in names if c != "message_id"]  # litequeue's ids mean nothing to PostgreSQL
    select = ", ".join(f'"{c}"' for c in names)
    insert = (
        f'INSERT INTO "{table}" ({select}) VALUES ({", ".join(["%s"] * len(names))}) ON CONFLICT DO NOTHING'
    )
    read = copied = 0
    cursor = src.execute(f'SELECT {select} FROM "{table}"')
    with conn.cursor() as cur:
        while batch := cursor.fetchmany(BATCH):
            read += len(batch)
            rows = [tuple(_convert(row[c], columns[c]) for c in names) for row in batch]
            cur.executemany(insert, rows)
            copied += cur.rowcount if cur.rowcount > 0 else 0
    return {"read": read, "copied": copied}


def _advance_identity(conn, table: str) -> None:
    """Ids copied explicitly do not move the identity sequence: move it past the largest id."""
    seq = conn.execute("SELECT pg_get_serial_sequence(%s, 'id') AS s", (table,)).fetchone()
    if seq and seq["s"]:
        conn.execute(
            f'SELECT setval(%s, greatest((SELECT coalesce(max(id), 0) FROM "{table}"), 1),'
            f' (SELECT count(*) > 0 FROM "{table}"))',
            (seq["s"],),
        )
