"""Validation of a range's small partitions against the same rows as one partition, in-process.

A year's range run validates its daily partitions a group at a time (consecutive partitions, up
to a row group's rows together: ``validate_partitions``), each partition getting its own result;
a single partition is validated one row group at a time after its latest versions are settled
(``latest_versions``, ``validate_row_groups``). Both are measured here on the same rows, decoded
from the simulator's dataset beforehand, without Dagster, staging or a database: what a
partition costs validation beyond its rows, in CPU time, repeated in turns.

    .venv/bin/python bench/validation_partitions.py
    .venv/bin/python bench/validation_partitions.py --clients 50000 --days 90 --repeat 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import _common as c
import pyarrow as pa

from hermes_orchestration.records import records_to_batch
from hermes_orchestration.simulator import SimulatorConfig
from hermes_orchestration.simulator_data import ClientDataset
from hermes_orchestration.staging import ROW_GROUP_ROWS
from hermes_orchestration.sync import _consecutive
from hermes_orchestration.validation import (
    latest_versions,
    validate_partitions,
    validate_row_groups,
)

NAME = "validation_partitions"
START = datetime(2025, 1, 1, tzinfo=UTC)
TODAY = date(2026, 1, 1)


def daily_tables(clients: int, days: int, seed: int) -> list[pa.Table]:
    """The raw rows of each day of the dataset, as a fetch stages them."""
    dataset = ClientDataset(
        SimulatorConfig(clients=clients, seed=seed, start=START, end=START + timedelta(days=days))
    )
    return [
        pa.Table.from_batches(
            [
                records_to_batch(
                    dataset.window(START + timedelta(days=d), START + timedelta(days=d + 1))
                )
            ]
        )
        for d in range(days)
    ]


def groups(tables: list[pa.Table]) -> list[list[pa.Table]]:
    """Consecutive partitions validated together, grouped as a range run groups them (at most
    a row group's rows in all; a larger partition alone)."""
    keys = [str(index) for index in range(len(tables))]
    rows_of = {key: table.num_rows for key, table in zip(keys, tables, strict=True)}
    return [
        [tables[int(key)] for key in group]
        for group in _consecutive(keys, rows_of.__getitem__, ROW_GROUP_ROWS)
    ]


def validate_range(grouped: list[list[pa.Table]]) -> int:
    valid = 0
    for group in grouped:
        results = validate_partitions(
            pa.concat_tables(group), [table.num_rows for table in group], today=TODAY
        )
        valid += sum(result.valid.num_rows for result in results)
    return valid


def validate_one(whole: pa.Table) -> int:
    pieces = whole.to_batches(max_chunksize=ROW_GROUP_ROWS)
    latest = latest_versions(pieces)
    return sum(result.valid.num_rows for result in validate_row_groups(pieces, latest, today=TODAY))


def timed(function: Callable[[], int]) -> tuple[float, float]:
    """CPU and wall seconds of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    function()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=365, help="daily partitions of the range")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=5, help="turns of each")
    args = parser.parse_args()
    info = c.machine()
    c.print_header("validation: a range's partitions together vs one partition", info)
    started = time.perf_counter()
    tables = daily_tables(args.clients, args.days, args.seed)
    whole = pa.concat_tables(tables).combine_chunks()
    grouped = groups(tables)
    rows = whole.num_rows
    print(f"{rows:,} rows: {args.days} partitions in {len(grouped)} groups, or one partition")
    times: dict[str, list[tuple[float, float]]] = {"range": [], "one partition": []}
    for _ in range(args.repeat):  # in turns: the machine's drift touches both alike
        times["range"].append(timed(lambda: validate_range(grouped)))
        times["one partition"].append(timed(lambda: validate_one(whole)))
    figures: dict[str, object] = {"rows": rows, "partitions": args.days, "groups": len(grouped)}
    median_cpu: dict[str, float] = {}
    for label, pairs in times.items():
        cpu = median_cpu[label] = statistics.median(pair[0] for pair in pairs)
        wall = statistics.median(pair[1] for pair in pairs)
        least = min(pair[0] for pair in pairs)
        figures[label] = {
            "cpu_seconds_median": round(cpu, 3),
            "cpu_seconds_min": round(least, 3),
            "wall_seconds_median": round(wall, 3),
            "rows_per_cpu_second": round(c.rate(rows, cpu)),
        }
        print(
            f"{label:>15}: CPU {cpu:.2f} s median (min {least:.2f} s), "
            f"wall {wall:.2f} s; {c.rate(rows, cpu):,.0f} rows per CPU second"
        )
    ratio = median_cpu["range"] / median_cpu["one partition"]
    extra_ms = 1000 * (median_cpu["range"] - median_cpu["one partition"]) / args.days
    print(
        f"range / one partition, CPU: {ratio:.2f}; {extra_ms:+.2f} ms per partition beyond its rows"
    )
    figures["range_over_one_cpu"] = round(ratio, 3)
    figures["extra_ms_per_partition"] = round(extra_ms, 3)
    return c.finish(NAME, info, figures, started=started)


if __name__ == "__main__":
    raise SystemExit(main())
