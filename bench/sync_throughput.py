"""Sync throughput: one partition of N clients synced end to end through Dagster into PostgreSQL.

For each ``--clients`` value: the simulator serves N clients (its default dirty share) whose
whole ``updated_at`` range falls in one daily partition; ``hermes-orchestration sync`` runs the
real Dagster job (fetch, validation, merge into master data on PostgreSQL) as a measured process,
first into an empty master database and then again over unchanged data. Then the reference
ceilings on the same data: fetching and decoding the pages alone, and a bare COPY of the flattened
rows into an empty table. Figures: rows/s of the run and of the whole command, the time of each
step, and the peak RSS of the sync process, the simulator and the PostgreSQL backends.

    .venv/bin/python bench/sync_throughput.py                      # 200,000 clients
    .venv/bin/python bench/sync_throughput.py --clients 200000 1000000   # the memory curve
    .venv/bin/python bench/sync_throughput.py --latency 0.02       # a site 20 ms away
    .venv/bin/python bench/sync_throughput.py --repeat 5           # ranges and medians

A machine's speed drifts from one run to the next: ``--repeat N`` measures each size N times,
from a fresh simulator and database each time, prints the range and median of each figure, and
judges the speed targets on the medians and the memory target on the highest peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import textwrap
import time
from datetime import datetime, timedelta
from datetime import time as day_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import _common as c

NAME = "sync_throughput"
INTEGRATION = "tienda_bench"
TIMEZONE = "America/Santiago"
PARTITION = "2026-11-02"
PAGE_SIZE = 1000


def partition_window(partition: str = PARTITION) -> tuple[datetime, datetime]:
    """The partition's [start, end) in the integration's time zone."""
    day = datetime.combine(datetime.fromisoformat(partition).date(), day_time(), ZoneInfo(TIMEZONE))
    return day, day + timedelta(days=1)


def measure_ceilings(
    sim: c.Simulator, state: Path, database: str, env: dict[str, str], scratch: Path, timeout: float
) -> dict[str, Any]:
    """Fetch-and-decode alone, and a bare COPY of the staged flattened rows."""
    since, until = partition_window()
    fetch = c.run_measured(
        [
            str(c.PYTHON),
            str(c.BENCH / "_reference.py"),
            "fetch",
            "--url",
            sim.url,
            "--token",
            c.TOKEN,
            "--since",
            since.isoformat(),
            "--until",
            until.isoformat(),
            "--page-size",
            str(PAGE_SIZE),
        ],
        env=env,
        timeout=timeout,
        scratch=scratch,
    ).check("the fetch ceiling")
    fetched = json.loads(fetch.stdout)
    raw = state / "staging" / INTEGRATION / "raw_clients" / f"{PARTITION}.parquet"
    with c.BackendWatch([database]) as watch:
        copy = c.run_measured(
            [
                str(c.PYTHON),
                str(c.BENCH / "_reference.py"),
                "copy",
                "--dsn",
                c.admin_dsn(database),
                str(raw),
            ],
            env=env,
            timeout=timeout,
            scratch=scratch,
        ).check("the COPY ceiling")
    copied = json.loads(copy.stdout)
    return {
        "fetch_decode": {
            "rows": fetched["rows"],
            "seconds": round(fetched["seconds"], 2),
            "rows_per_second": round(c.rate(fetched["rows"], fetched["seconds"])),
            "peak_rss_mb": fetch.peak_rss_mb,
        },
        "bare_copy": {
            "rows": copied["rows"],
            "seconds": round(copied["seconds"], 2),
            "rows_per_second": round(c.rate(copied["rows"], copied["seconds"])),
            "peak_rss_mb": {"process": copy.peak_rss_mb, "postgres": watch.summary()},
        },
    }


def bench_one(clients: int, seed: int, timeout: float, latency: float) -> dict[str, Any]:
    """Everything for one dataset size, from a fresh simulator and database."""
    start, end = partition_window()
    # The whole updated_at range inside the one partition, an hour clear of both edges.
    data_start, data_end = start + timedelta(hours=1), end - timedelta(hours=1)
    load = c.load_average()
    with (
        tempfile.TemporaryDirectory(prefix="hermes_bench_") as tmp,
        c.simulator(
            clients=clients, start=data_start, end=data_end, seed=seed, latency=latency
        ) as sim,
        c.postgres_database("hermes_bench_sync") as database,
    ):
        root = Path(tmp)
        home = c.write_dagster_yaml(root / "dagster_home")
        yaml = c.write_integrations(
            root / "integrations.yaml",
            [c.integration_entry(INTEGRATION, site_url=sim.url, page_size=PAGE_SIZE)],
            TIMEZONE,
        )
        state = root / "state"
        env = c.project_env(
            dagster_home=home, integrations_file=yaml, state_dir=state, masterdata_database=database
        )
        scratch = root / "out"
        print(
            f"\n-- {clients:,} clients: {sim.versions:,} client versions in partition {PARTITION}"
            f" (simulator ready in {sim.startup_seconds:.1f} s"
            f"{f'; it answers each request after {latency * 1000:g} ms' if latency else ''});"
            f" load {load}",
            flush=True,
        )
        common = {
            "name": INTEGRATION,
            "partition": PARTITION,
            "env": env,
            "dagster_home": home,
            "scratch": scratch,
            "databases": [database],
            "timeout": timeout,
        }
        first = c.measure_sync(**common, what="the first sync")
        print_sync("first load", first)
        resync = c.measure_sync(**common, what="the unchanged re-sync")
        print_sync("unchanged re-sync", resync)
        ceilings = measure_ceilings(sim, state, database, env, scratch, timeout)
        simulator_peak = sim.read_peak()
    result = {
        "clients": clients,
        "site_latency_seconds": latency,
        "versions_served": sim.versions,
        "load_average_before": load,
        "load_average_after": c.load_average(),
        "first_load": first,
        "unchanged_resync": resync,
        "ceilings": ceilings,
        "simulator_peak_rss_mb": simulator_peak,
        "resync_speedup": round(first["run_seconds"] / resync["run_seconds"], 2),
        "ratio_to_fetch_ceiling": round(
            first["run_rows_per_second"] / ceilings["fetch_decode"]["rows_per_second"], 3
        ),
        "ratio_to_copy_ceiling": round(
            first["run_rows_per_second"] / ceilings["bare_copy"]["rows_per_second"], 3
        ),
    }
    print_ceilings(result)
    return result


def print_sync(label: str, figures: dict[str, Any]) -> None:
    """One sync's figures."""
    loaded = figures["metadata"].get("master_data", {})
    pg = figures["peak_rss_mb"]["postgres"]
    indent = " " * 20
    print(
        f"{label:>18}: {figures['rows']:,} rows; run {figures['run_seconds']:.2f} s = "
        f"{figures['run_rows_per_second']:,} rows/s; whole process {figures['command_seconds']:.2f}"
        f" s = {figures['command_rows_per_second']:,} rows/s\n"
        + textwrap.indent(c.describe_stages(figures), indent)
        + f"\n{indent}peak RSS: sync process {figures['peak_rss_mb']['sync_process']} MB, "
        f"PostgreSQL backend {pg['peak_rss_mb']} MB ({pg['peak_private_mb']} MB private, "
        f"{pg['backends_seen']} backends)\n"
        f"{indent}master data: {loaded.get('sources_inserted', '?')} inserted, "
        f"{loaded.get('sources_updated', '?')} updated, "
        f"{loaded.get('sources_unchanged', '?')} unchanged sources; "
        f"{loaded.get('rejected', '?')} rejected",
        flush=True,
    )


def print_ceilings(result: dict[str, Any]) -> None:
    """The reference ceilings and the sync's ratio to each."""
    fetch, copy = result["ceilings"]["fetch_decode"], result["ceilings"]["bare_copy"]
    first = result["first_load"]["run_rows_per_second"]
    print(
        f"{'fetch+decode alone':>18}: {fetch['rows']:,} rows in {fetch['seconds']:.2f} s = "
        f"{fetch['rows_per_second']:,} rows/s (peak RSS {fetch['peak_rss_mb']} MB); "
        f"sync/this = {result['ratio_to_fetch_ceiling']:.2f}\n"
        f"{'bare COPY':>18}: {copy['rows']:,} rows in {copy['seconds']:.2f} s = "
        f"{copy['rows_per_second']:,} rows/s (peak RSS {copy['peak_rss_mb']['process']} MB, "
        f"backend {copy['peak_rss_mb']['postgres']['peak_rss_mb']} MB); "
        f"sync/this = {result['ratio_to_copy_ceiling']:.2f}\n"
        f"{'':>20}first load {first:,} rows/s; unchanged re-sync "
        f"{result['resync_speedup']:.2f}x faster; simulator peak RSS "
        f"{result['simulator_peak_rss_mb']} MB",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[200_000], help="dataset sizes (default 200000)"
    )
    parser.add_argument("--seed", type=int, default=7, help="simulator dataset seed (default 7)")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="limit per measured process, s (default 1800)"
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds the simulator waits before each answer, as a site across a network would "
        "(default 0: the site on this machine answers at once)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each size; medians judge the speed targets"
    )
    args = parser.parse_args()
    info = c.machine()
    c.print_header("sync throughput: one partition through Dagster into PostgreSQL", info)
    started = time.perf_counter()
    by_size = {
        clients: [
            bench_one(clients, args.seed, args.timeout, args.latency) for _ in range(args.repeat)
        ]
        for clients in args.clients
    }
    summaries = {clients: summarize(runs) for clients, runs in by_size.items()}
    if args.repeat > 1:
        print(f"\n-- {args.repeat} runs of each size: range (median)")
        for clients, summary in summaries.items():
            print_summary(clients, summary)
    if len(by_size) > 1:
        print("\n-- memory curve (highest peak RSS of the sync process, first load / re-sync)")
        for clients, summary in summaries.items():
            peaks = summary["peak_rss_mb"]
            print(f"{clients:>12,} clients: {peaks['first_load'][1]} MB / {peaks['resync'][1]} MB")
    print()
    base_clients, base = next(iter(summaries.items()))
    targets = [
        c.check_target(
            f"first load rows/s ({base_clients:,} clients)",
            base["first_load_rows_per_second"][2],
            35_000,
        ),
        c.check_target("unchanged re-sync speed-up", base["resync_speedup"][2], 3.0),
        *(
            c.check_target(
                f"peak RSS of the sync process, MB ({clients:,} clients)",
                max(summary["peak_rss_mb"]["first_load"][1], summary["peak_rss_mb"]["resync"][1]),
                150,
                at_most=True,
            )
            for clients, summary in summaries.items()
        ),
    ]
    runs = [run for size_runs in by_size.values() for run in size_runs]
    figures = {"runs": runs, "summary": {str(clients): s for clients, s in summaries.items()}}
    return c.finish(NAME, info, figures, targets=targets, started=started)


def _spread(values: list[float]) -> tuple[float, float, float]:
    """(lowest, highest, median)."""
    return min(values), max(values), round(statistics.median(values), 2)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The range and median of each figure over the runs of one size."""
    first = [run["first_load"] for run in runs]
    resync = [run["unchanged_resync"] for run in runs]
    return {
        "runs": len(runs),
        "first_load_rows_per_second": _spread([f["run_rows_per_second"] for f in first]),
        "first_load_run_seconds": _spread([f["run_seconds"] for f in first]),
        "resync_run_seconds": _spread([r["run_seconds"] for r in resync]),
        "resync_speedup": _spread([run["resync_speedup"] for run in runs]),
        "fetch_decode_rows_per_second": _spread(
            [run["ceilings"]["fetch_decode"]["rows_per_second"] for run in runs]
        ),
        "bare_copy_rows_per_second": _spread(
            [run["ceilings"]["bare_copy"]["rows_per_second"] for run in runs]
        ),
        "peak_rss_mb": {
            "first_load": _spread([f["peak_rss_mb"]["sync_process"] for f in first]),
            "resync": _spread([r["peak_rss_mb"]["sync_process"] for r in resync]),
        },
    }


def print_summary(clients: int, summary: dict[str, Any]) -> None:
    """The range and median of each figure of one size."""

    def spread(values: tuple[float, float, float], unit: str = "") -> str:
        low, high, median = (f"{v:,.0f}" if v >= 1000 else f"{v:g}" for v in values)
        return f"{low}{unit} to {high}{unit} ({median}{unit})"

    peaks, rate = summary["peak_rss_mb"], summary["first_load_rows_per_second"]
    print(
        f"{clients:>12,} clients: first load {spread(rate)} rows/s,"
        f" run {spread(summary['first_load_run_seconds'], ' s')}\n"
        f"{'':>22}unchanged re-sync {spread(summary['resync_speedup'], 'x')} faster, run "
        f"{spread(summary['resync_run_seconds'], ' s')}\n"
        f"{'':>22}peak RSS {spread(peaks['first_load'], ' MB')}, re-sync "
        f"{spread(peaks['resync'], ' MB')}\n"
        f"{'':>22}fetch+decode alone {spread(summary['fetch_decode_rows_per_second'])} rows/s, "
        f"bare COPY {spread(summary['bare_copy_rows_per_second'])} rows/s",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
