"""Backfill: a year of daily partitions synced as one run, against the same volume as one partition.

Two datasets of ``--clients`` clients from the simulator (same seed, default dirty share): one
whose ``updated_at`` range covers 365 days, synced with one single-run backfill
(``launch.sync_now(..., first=<day 1>, last=<day 365>)``: one paged listing of the whole year,
then validation and a master-data transaction per partition), and one whose range falls in one
day, synced as that one partition. Both through Dagster into PostgreSQL, from an empty master
database. Prints each run's rows/s, the ratio, and the peak RSS of every process.

    .venv/bin/python bench/backfill.py
    .venv/bin/python bench/backfill.py --clients 50000 --days 30
    .venv/bin/python bench/backfill.py --profile   # each sync under py-spy, summarized per step
    .venv/bin/python bench/backfill.py --dagster-storage postgres --repeat 5   # median of 5 turns
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import textwrap
import time
from datetime import date, datetime, timedelta
from datetime import time as day_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import _common as c
import profile_sync as profiling

NAME = "backfill"
INTEGRATION = "tienda_bench"
TIMEZONE = "America/Santiago"
LAST_DAY = date(2026, 11, 1)  # the backfill's last partition; the one-day run syncs the next day


def local_midnight(day: date) -> datetime:
    """The start of ``day`` in the integration's time zone."""
    return datetime.combine(day, day_time(), ZoneInfo(TIMEZONE))


def measure(
    label: str,
    clients: int,
    first: date,
    last: date,
    seed: int,
    timeout: float,
    sql_timing: bool = False,
    profile: str | None = None,
    dagster_storage: str = "sqlite",
) -> dict[str, Any]:
    """Sync partitions ``first``..``last`` as one run from a simulator whose data spans them."""
    # The data keeps an hour clear of both ends of the range.
    data_start = local_midnight(first) + timedelta(hours=1)
    data_end = local_midnight(last + timedelta(days=1)) - timedelta(hours=1)
    load = c.load_average()
    with (
        tempfile.TemporaryDirectory(prefix="hermes_bench_") as tmp,
        c.simulator(clients=clients, start=data_start, end=data_end, seed=seed) as sim,
        c.postgres_database("hermes_bench_backfill") as database,
        c.postgres_database("hermes_bench_dagster") as dagster_database,
    ):
        root = Path(tmp)
        raw_stacks = c.RESULTS / f"{NAME}_{clients}_{label.replace(' ', '_')}.txt"
        prefix = []
        if profile:
            c.RESULTS.mkdir(parents=True, exist_ok=True)
            prefix = [profile, "record", "--idle", "--nolineno", "-r", str(profiling.RATE)]
            prefix += ["-f", "raw", "-o", str(raw_stacks), "--"]
        home = c.write_dagster_yaml(
            root / "dagster_home",
            postgres_database=dagster_database if dagster_storage == "postgres" else None,
        )
        yaml = c.write_integrations(
            root / "integrations.yaml",
            [c.integration_entry(INTEGRATION, site_url=sim.url, start=first.isoformat())],
            TIMEZONE,
        )
        env = c.project_env(
            dagster_home=home,
            integrations_file=yaml,
            state_dir=root / "state",
            masterdata_database=database,
        )
        figures = c.measure_sync(
            name=INTEGRATION,
            partition=first.isoformat(),
            last=last.isoformat() if last != first else None,
            env=env,
            dagster_home=home,
            scratch=root / "out",
            databases=[database, dagster_database],
            timeout=timeout,
            what=f"the {label} sync",
            sql_timing=sql_timing,
            prefix=prefix,
        )
        simulator_peak = sim.read_peak()
    partitions = (last - first).days + 1
    result = {
        "label": label,
        "dagster_storage": dagster_storage,
        "partitions": partitions,
        "first_partition": first.isoformat(),
        "last_partition": last.isoformat(),
        "versions_served": sim.versions,
        "load_average_before": load,
        "simulator_peak_rss_mb": simulator_peak,
        **figures,
    }
    loaded = figures["metadata"].get("master_data", {})
    pg = figures["peak_rss_mb"]["postgres"]
    print(
        f"{label:>22}: {partitions} partition(s), {figures['rows']:,} rows; run "
        f"{figures['run_seconds']:.2f} s = {figures['run_rows_per_second']:,} rows/s; whole "
        f"process {figures['command_seconds']:.2f} s (load {load})\n"
        + textwrap.indent(c.describe_stages(figures), " " * 24)
        + f"\n{'':>24}peak RSS: sync process {figures['peak_rss_mb']['sync_process']} MB, "
        f"simulator {simulator_peak} MB, PostgreSQL backend {pg['peak_rss_mb']} MB "
        f"({pg['peak_private_mb']} MB private)\n"
        f"{'':>24}master data: {loaded.get('sources_inserted', '?')} sources inserted, "
        f"{loaded.get('rejected', '?')} rejected",
        flush=True,
    )
    if "sql" in figures:
        print(f"{'':>24}PostgreSQL statements by total time (SQLAlchemy; COPY not included):")
        print(textwrap.indent(c.describe_sql(figures["sql"], width=90), " " * 24), flush=True)
    if profile:
        result["profile"] = profiling.summarize(raw_stacks, label, top=20)
        print(f"   raw stacks: {raw_stacks.relative_to(c.REPO)}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=365, help="partitions of the backfill")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=3600, help="limit per sync, s")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="turns of both syncs; the target is judged on the median",
    )
    parser.add_argument(
        "--sql-timing", action="store_true", help="also list the slowest PostgreSQL statements"
    )
    parser.add_argument(
        "--dagster-storage",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="Dagster's own storage (runs, event logs): the embedded default or PostgreSQL",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run each sync under py-spy (not a dependency: .venv/bin/pip install py-spy)",
    )
    args = parser.parse_args()
    py_spy = None
    if args.profile:
        py_spy = shutil.which("py-spy", path=str(c.VENV_BIN)) or shutil.which("py-spy")
        if not py_spy:
            parser.error("py-spy is not installed: .venv/bin/pip install py-spy")
    info = c.machine()
    title = "backfill: a year of partitions in one run vs one partition"
    c.print_header(f"{title} (Dagster storage: {args.dagster_storage})", info)
    started = time.perf_counter()
    first = LAST_DAY - timedelta(days=args.days - 1)
    one_day = LAST_DAY + timedelta(days=1)
    runs: list[dict[str, Any]] = []

    def sync(label: str, first_day: date, last_day: date) -> dict[str, Any]:
        return measure(
            label, args.clients, first_day, last_day, args.seed, args.timeout,
            args.sql_timing, py_spy, args.dagster_storage,
        )  # fmt: skip

    for turn in range(1, args.repeat + 1):  # in turns: the machine's drift touches both alike
        if args.repeat > 1:
            print(f"\n-- turn {turn} of {args.repeat}", flush=True)
        backfill = sync(f"{args.days}-day backfill", first, LAST_DAY)
        single = sync("one partition", one_day, one_day)
        ratio = backfill["run_rows_per_second"] / single["run_rows_per_second"]
        print(
            f"\nbackfill rows/s / one-partition rows/s = {ratio:.2f} "
            f"({backfill['run_rows_per_second']:,} / {single['run_rows_per_second']:,})"
        )
        runs.append({"backfill": backfill, "one_partition": single, "ratio": round(ratio, 3)})
    ratios = [run["ratio"] for run in runs]
    ratio = statistics.median(ratios)
    if len(runs) > 1:
        print(f"\nratios of the {len(runs)} turns: {ratios}; median {ratio:.2f}")
    # In percent: with two decimals, a ratio of 0.795 would print as "0.80 >= 0.80? NOT MET".
    share = round(100 * ratio, 1)
    targets = [c.check_target("backfill rows/s as a share of one partition's, %", share, 80)]
    # The last turn's runs in full, as with one turn; every turn's under "turns".
    figures = {**runs[-1], "ratio": round(ratio, 3), "ratios": ratios, "turns": runs}
    return c.finish(NAME, info, figures, targets=targets, started=started)


if __name__ == "__main__":
    raise SystemExit(main())
