"""Reference ceilings on the same data as a sync, each run as its own measured process.

- ``fetch``: fetch and decode every page of a window, one request after the other over one
  connection, nothing else: the most the API side can deliver. (Not through ``HermesClient``,
  which requests the next page on a thread while its caller works on a page: for a caller that
  does nothing with the pages, that hand-over costs and buys nothing.)
- ``copy``: a bare ``COPY`` of the flattened client fields (the text columns that the sync
  stages) into an empty table, with psycopg 3, streamed in batches in PostgreSQL's binary format
  (encoded by pgpq, as the sync's loads are): the most PostgreSQL can take.

Prints one JSON object: rows, seconds (of the measured part only, imports excluded).
Not meant to be run by hand; ``sync_throughput.py`` and ``backfill.py`` run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime

import httpx
import orjson
import psycopg
import pyarrow.parquet as pq
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import sql

from hermes_orchestration.hermes_client import API_PREFIX, format_time, normalize_site_url
from hermes_orchestration.records import CLIENT_FIELDS

_BATCH_ROWS = 50_000


def fetch(url: str, token: str, since: datetime, until: datetime, page_size: int) -> dict:
    """Read the whole window page by page, as the contract pages it; count records and pages."""
    started = time.perf_counter()
    rows = pages = 0
    params = {
        "updated_since": format_time(since),
        "updated_until": format_time(until),
        "limit": str(page_size),
    }
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    with httpx.Client(
        base_url=normalize_site_url(url) + API_PREFIX, headers=headers, timeout=60
    ) as client:
        cursor = None
        while True:
            query = params if cursor is None else {**params, "cursor": cursor}
            response = client.get("/clients", params=query)
            response.raise_for_status()
            body = orjson.loads(response.content)
            rows += len(body["data"])
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
    return {"rows": rows, "pages": pages, "seconds": time.perf_counter() - started}


def copy(dsn: str, parquet_files: list[str]) -> dict:
    """COPY the client fields of staged raw Parquet files into a new, empty table."""
    columns = [*CLIENT_FIELDS, "unknown_fields"]
    # Read before the clock starts: the ceiling is what PostgreSQL takes, not Parquet decoding.
    tables = [pq.read_table(path, columns=columns) for path in parquet_files]
    encoder = ArrowToPostgresBinaryEncoder(tables[0].schema)
    started = time.perf_counter()
    rows = 0
    with psycopg.connect(dsn) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE bare_copy ({})").format(
                sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in columns)
            )
        )
        statement = sql.SQL("COPY bare_copy ({}) FROM STDIN (FORMAT binary)").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        )
        with conn.cursor() as cursor, cursor.copy(statement) as out:
            out.write(encoder.write_header())
            for table in tables:
                for batch in table.to_batches(max_chunksize=_BATCH_ROWS):
                    out.write(encoder.write_batch(batch))
                    rows += batch.num_rows
            out.write(encoder.finish())
        conn.commit()
    seconds = time.perf_counter() - started
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE bare_copy")
    return {"rows": rows, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--url", required=True)
    f.add_argument("--token", required=True)
    f.add_argument("--since", required=True, type=datetime.fromisoformat)
    f.add_argument("--until", required=True, type=datetime.fromisoformat)
    f.add_argument("--page-size", type=int, default=1000)
    c = sub.add_parser("copy")
    c.add_argument("--dsn", required=True)
    c.add_argument("parquet", nargs="+")
    args = parser.parse_args()
    if args.what == "fetch":
        result = fetch(args.url, args.token, args.since, args.until, args.page_size)
    else:
        result = copy(args.dsn, args.parquet)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
