"""Where the time of a sync goes: the sync_throughput scenario under py-spy, summarized per step.

Starts the simulator (one partition of ``--clients`` clients) and a PostgreSQL database, then
runs the sync process (``_sync_probe.py``: ``launch.sync_now`` as the CLI calls it) under
``py-spy record`` with idle time included (waiting on PostgreSQL or on the site counts), first
load and then an unchanged re-sync. Prints, for the main thread, the wall time spent inside each
part of the sync (inclusive) and the functions that take the most time themselves. The raw
stacks (collapsed, one per line; flamegraph tools read them) are written under
``bench/results/``.

Needs py-spy, which is not a project dependency: ``.venv/bin/pip install py-spy``.

    .venv/bin/python bench/profile_sync.py
    .venv/bin/python bench/profile_sync.py --clients 1000000 --native
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import textwrap
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import _common as c
from sync_throughput import INTEGRATION, PAGE_SIZE, PARTITION, TIMEZONE, partition_window

NAME = "profile_sync"
RATE = 100  # samples per second

# Parts of a sync, matched as "function (file" in the stacks; time is inclusive.
PARTS: list[tuple[str, str]] = [
    ("process: imports + definitions", "main (bench/_sync_probe.py"),  # refined below
    ("run: fetch step (raw_clients)", "fetch_raw_clients (hermes_orchestration/sync.py"),
    ("  HTTP + JSON decode (HermesClient)", "_get (hermes_orchestration/hermes_client.py"),
    ("  flatten pages (records_to_batch)", "records_to_batch (hermes_orchestration/records.py"),
    ("  bucket rows by partition (_by_partition)", "_by_partition (hermes_orchestration/sync.py"),
    ("  Parquet write (StagedWrites.write)", "write (hermes_orchestration/staging.py"),
    ("run: validation step (validated_clients)", "validate_clients (hermes_orchestration/sync.py"),
    ("  ids and instants (latest_versions)", "latest_versions (hermes_orchestration/validation.py"),
    (
        "  validate_partition (by row group)",
        "validate_partition (hermes_orchestration/validation.py",
    ),
    ("run: load step (master_data)", "load_master_data (hermes_orchestration/sync.py"),
    ("  copy into the stage table (_stage)", "_stage (hermes_orchestration/masterdata.py"),
    ("  set-based merge (_Merge.run)", "run (hermes_orchestration/masterdata.py"),
    ("  ensure_schema", "ensure_schema (hermes_orchestration/masterdata.py"),
    ("run: Dagster's events and log lines, all steps", "log_manager.py"),
]

_FRAME = re.compile(r"^(?P<function>.+?) \((?P<file>[^:)]+)")


def parse_raw(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw output: one collapsed stack per line, ``frame;frame;... count``."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def main_thread(stacks: Counter[tuple[str, ...]]) -> Counter[tuple[str, ...]]:
    """The stacks of the main thread: those rooted in the probe's module code."""
    return Counter(
        {stack: n for stack, n in stacks.items() if stack and "_sync_probe.py" in stack[0]}
    )


def inclusive(stacks: Counter[tuple[str, ...]], pattern: str) -> int:
    """Samples whose stack contains a frame matching ``pattern``."""
    return sum(n for stack, n in stacks.items() if any(pattern in frame for frame in stack))


def self_time(stacks: Counter[tuple[str, ...]], top: int) -> list[tuple[str, int]]:
    """The functions where the most samples end (leaf frames), without line numbers."""
    leaves: Counter[str] = Counter()
    for stack, n in stacks.items():
        match = _FRAME.match(stack[-1])
        leaves[f"{match['function']} ({match['file']})" if match else stack[-1]] += n
    return leaves.most_common(top)


def summarize(raw: Path, label: str, top: int) -> dict[str, Any]:
    """Seconds per part of the sync and the top self-time functions, printed and returned."""
    stacks = main_thread(parse_raw(raw))
    total = sum(stacks.values())
    parts = {name: inclusive(stacks, pattern) / RATE for name, pattern in PARTS}
    run = inclusive(stacks, "execute_in_process (")
    parts["process: imports + definitions"] = (total - run) / RATE
    parts["run (execute_in_process), all"] = run / RATE
    print(f"\n-- {label}: {total / RATE:.1f} s of main-thread wall time sampled")
    for name, seconds in parts.items():
        share = 100 * seconds * RATE / total if total else 0
        print(f"   {name:<46} {seconds:7.2f} s  {share:5.1f} %")
    leaves = self_time(stacks, top)
    print(f"   top {top} functions by self time (wall, idle included):")
    for function, n in leaves:
        print(f"   {n / RATE:7.2f} s  {function}")
    return {
        "sampled_seconds": total / RATE,
        "parts_seconds": {name: round(value, 2) for name, value in parts.items()},
        "top_self_seconds": [(function, n / RATE) for function, n in leaves],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--top", type=int, default=25, help="functions listed by self time")
    parser.add_argument("--native", action="store_true", help="sample C/C++ frames too")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy", path=str(c.VENV_BIN)) or shutil.which("py-spy")
    if not py_spy:
        parser.error("py-spy is not installed: .venv/bin/pip install py-spy")
    info = c.machine()
    c.print_header("profile of a sync (py-spy, wall time, main thread)", info)
    start, end = partition_window()
    results: dict[str, Any] = {}
    c.RESULTS.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="hermes_bench_") as tmp,
        c.simulator(
            clients=args.clients,
            start=start + timedelta(hours=1),
            end=end - timedelta(hours=1),
            seed=args.seed,
        ) as sim,
        c.postgres_database("hermes_bench_profile") as database,
    ):
        root = Path(tmp)
        home = c.write_dagster_yaml(root / "dagster_home")
        yaml = c.write_integrations(
            root / "integrations.yaml",
            [c.integration_entry(INTEGRATION, site_url=sim.url, page_size=PAGE_SIZE)],
            TIMEZONE,
        )
        env = c.project_env(
            dagster_home=home,
            integrations_file=yaml,
            state_dir=root / "state",
            masterdata_database=database,
        )
        for label in ("first_load", "unchanged_resync"):
            raw = c.RESULTS / f"{NAME}_{args.clients}_{label}.txt"
            record = [py_spy, "record", "--idle", "--nolineno", "-r", str(RATE), "-f", "raw"]
            if args.native:
                record.append("--native")
            load = c.load_average()
            measured = c.run_measured(
                [
                    *record,
                    "-o",
                    str(raw),
                    "--",
                    *c.sync_command(INTEGRATION, PARTITION, sql_timing=True),
                ],
                env=env,
                timeout=args.timeout,
                scratch=root / "out",
            ).check(f"the profiled sync ({label})")
            probe = c.last_json_line(measured.stdout)
            results[label] = {
                "load_average_before": load,
                "wall_seconds": round(measured.seconds, 1),
                "run_seconds": probe["run_seconds"],
                **summarize(raw, f"{label} (load {load})", args.top),
                "postgresql_statements": probe["sql"],
            }
            print("   PostgreSQL statements by total time (SQLAlchemy; COPY not included):")
            print(textwrap.indent(c.describe_sql(probe["sql"]), "   "))
            print(f"   raw stacks: {raw.relative_to(c.REPO)}")
    return c.finish(NAME, info, results, file_name=f"{NAME}_{args.clients}")


if __name__ == "__main__":
    raise SystemExit(main())
