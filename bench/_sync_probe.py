"""One sync, exactly as ``hermes-orchestration sync`` does it, with the time of each stage.

Mirrors ``cli.cmd_sync``: import the definitions module, read the integrations file, build the
definitions of the integration synced, then ``launch.sync_now`` (a real run of the shared job,
in process, recorded in the instance of DAGSTER_HOME) and the console script's exit. Prints one
JSON object; exit status 1 if the run failed. Run by the benchmarks as the measured "sync process".
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--partition", required=True)
    parser.add_argument("--to", default=None)
    parser.add_argument(
        "--sql-timing", action="store_true", help="time every PostgreSQL statement (SQLAlchemy)"
    )
    args = parser.parse_args()
    sql = _time_sql() if args.sql_timing else None
    memory = _RssSampler()

    timings: dict[str, float] = {}
    started = time.perf_counter()
    import dagster as dg

    from hermes_orchestration.config import load_integrations
    from hermes_orchestration.jobs import sync_job_name
    from hermes_orchestration.launch import sync_now

    timings["imports"] = time.perf_counter() - started

    mark = time.perf_counter()
    # Importing the module builds ``defs`` from the integrations file, as the CLI's import does.
    from hermes_orchestration.code_location import build_definitions

    timings["definitions_module_import"] = time.perf_counter() - mark

    mark = time.perf_counter()
    config = load_integrations()
    integration = config.get(args.name)
    timings["load_yaml"] = time.perf_counter() - mark

    mark = time.perf_counter()
    defs = build_definitions(config.only(args.name))  # as cmd_sync: this integration's alone
    timings["build_definitions"] = time.perf_counter() - mark

    mark = time.perf_counter()
    defs.resolve_job_def(sync_job_name(integration))
    timings["resolve_job"] = time.perf_counter() - mark

    with dg.DagsterInstance.get() as instance:
        mark = time.perf_counter()
        result = sync_now(defs, integration, instance, first=args.partition, last=args.to)
        timings["sync_now"] = time.perf_counter() - mark
        stats = instance.get_run_stats(result.run_id)
        run_seconds = (stats.end_time or 0) - (stats.start_time or 0)
    timings["total"] = time.perf_counter() - started
    json.dump(
        {
            "run_id": result.run_id,
            "success": result.success,
            "seconds": {name: round(value, 3) for name, value in timings.items()},
            "run_seconds": round(run_seconds, 3),
            # Everything sync_now does outside the run's own start..end: subsetting the job,
            # snapshots, creating the run record.
            "outside_run_seconds": round(timings["sync_now"] - run_seconds, 3),
            "rss_samples": memory.stop(),
            **({"sql": _top_statements(sql)} if sql is not None else {}),
        },
        sys.stdout,
    )
    return 0 if result.success else 1


class _RssSampler:
    """Samples this process's RSS every 50 ms, to tell which step holds the peak."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        import psutil

        self._process = psutil.Process()
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self._process.memory_info().rss / 2**20
            self._samples.append((round(time.time(), 3), round(rss, 1)))
            self._stop.wait(self._interval)

    def stop(self) -> list[tuple[float, float]]:
        """The samples, as (epoch seconds, RSS in MB)."""
        self._stop.set()
        self._thread.join()
        return self._samples


def _time_sql() -> dict[str, list[float]]:
    """Count and time every statement sent to PostgreSQL through SQLAlchemy, by statement text.

    COPY goes through the driver connection directly and is not seen here.
    """
    import sqlalchemy as sa

    stats: dict[str, list[float]] = {}

    @sa.event.listens_for(sa.engine.Engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    @sa.event.listens_for(sa.engine.Engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany) -> None:
        elapsed = time.perf_counter() - conn.info["bench_started"].pop()
        if conn.dialect.name == "postgresql":
            entry = stats.setdefault(" ".join(statement.split()), [0, 0.0])
            entry[0] += 1
            entry[1] += elapsed

    return stats


def _top_statements(stats: dict[str, list[float]], top: int = 12) -> dict[str, object]:
    ranked = sorted(stats.items(), key=lambda item: -item[1][1])[:top]
    return {
        "total_seconds": round(sum(total for _, total in stats.values()), 3),
        "total_calls": int(sum(calls for calls, _ in stats.values())),
        "top": [
            {"seconds": round(total, 3), "calls": int(calls), "statement": text[:300]}
            for text, (calls, total) in ranked
        ],
    }


if __name__ == "__main__":
    from hermes_orchestration.cli import exit_without_teardown

    exit_without_teardown(main())  # as the console script ends
