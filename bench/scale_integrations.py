"""Scale with integrations: what 10, 100, 500 and 1,000 declared integrations cost.

For each count, a generated integrations.yaml (every integration on one calendar, all pointing at
one simulator) and three measurements, each in a fresh process:

- definitions build: imports, reading the YAML and building ``defs``, resolving the repository,
  and the snapshot a code server serves (time and size), with the process's peak RSS;
- code-location load: the wall time of ``dagster definitions validate -m
  hermes_orchestration.definitions``;
- the fixed overhead of one sync run: ``hermes-orchestration sync`` of one integration over a
  tiny partition (a few clients), into PostgreSQL: the run's duration (everything but moving
  rows) and the whole command's.

    .venv/bin/python bench/scale_integrations.py
    .venv/bin/python bench/scale_integrations.py --counts 10 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import _common as c
from sync_throughput import INTEGRATION, PARTITION, TIMEZONE, partition_window

NAME = "scale_integrations"
TINY_CLIENTS = 20


def integration_names(count: int) -> list[str]:
    """``count`` integration names; the first is the one that is synced."""
    return [INTEGRATION, *(f"tienda_{index:04d}" for index in range(1, count))]


def measure_count(
    count: int, sim: c.Simulator, database: str, root: Path, repeat: int, timeout: float
) -> dict[str, Any]:
    """The three measurements for ``count`` integrations."""
    folder = root / f"n{count}"
    yaml = c.write_integrations(
        folder / "integrations.yaml",
        [
            c.integration_entry(name, site_url=sim.url, master_database=f"clientes_n{count}")
            for name in integration_names(count)
        ],
        TIMEZONE,
    )
    scratch = folder / "out"
    runs: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    validates: list[c.Measured] = []
    for attempt in range(repeat):
        home = c.write_dagster_yaml(folder / f"dagster_home_{attempt}")
        env = c.project_env(
            dagster_home=home,
            integrations_file=yaml,
            state_dir=folder / f"state_{attempt}",
            masterdata_database=database,
        )
        probe = c.run_measured(
            [str(c.PYTHON), str(c.BENCH / "_defs_probe.py")],
            env=env,
            timeout=timeout,
            scratch=scratch,
        ).check("the definitions probe")
        probes.append({**json.loads(probe.stdout), "process_seconds": round(probe.seconds, 2)})
        validates.append(
            c.run_measured(
                [
                    str(VENV_DAGSTER),
                    "definitions",
                    "validate",
                    "-m",
                    "hermes_orchestration.definitions",
                ],
                env=env,
                timeout=timeout,
                scratch=scratch,
            ).check("dagster definitions validate")
        )
        # A new master database name per count and attempt: every sync is a first load.
        env["HERMES_INTEGRATIONS_FILE"] = str(
            c.write_integrations(
                folder / f"integrations_{attempt}.yaml",
                [
                    c.integration_entry(
                        name, site_url=sim.url, master_database=f"clientes_n{count}_{attempt}"
                    )
                    for name in integration_names(count)
                ],
                TIMEZONE,
            )
        )
        runs.append(
            c.measure_sync(
                name=INTEGRATION,
                partition=PARTITION,
                env=env,
                dagster_home=home,
                scratch=scratch,
                databases=[database],
                timeout=timeout,
                what="the tiny sync",
            )
        )
    best_probe = min(probes, key=lambda p: p["seconds"]["load_yaml_and_build"])
    best_run = min(runs, key=lambda r: r["command_seconds"])
    best_validate = min(validates, key=lambda m: m.seconds)
    result = {
        "integrations": count,
        "load_average": c.load_average(),
        "definitions": best_probe,
        "definitions_validate_seconds": round(best_validate.seconds, 2),
        "definitions_validate_peak_rss_mb": best_validate.peak_rss_mb,
        "sync_run": best_run,
        "attempts": {
            "probe_build_seconds": [p["seconds"]["load_yaml_and_build"] for p in probes],
            "validate_seconds": [round(m.seconds, 2) for m in validates],
            "run_seconds": [r["run_seconds"] for r in runs],
            "command_seconds": [r["command_seconds"] for r in runs],
        },
    }
    print_count(result)
    return result


def print_count(result: dict[str, Any]) -> None:
    """One count's figures."""
    d, run = result["definitions"], result["sync_run"]
    s = d["seconds"]
    print(
        f"{result['integrations']:>6,} integrations (load {result['load_average']}):\n"
        f"    definitions: imports {s['imports']:.2f} s, "
        f"YAML + build {s['load_yaml_and_build']:.2f} s "
        f"(YAML alone {s['load_yaml_alone']:.2f} s), "
        f"resolve {s['resolve_repository']:.2f} s, "
        f"snapshot {s['snapshot']:.2f} s / {d['snapshot_bytes'] / c.MB:.1f} MB, {d['jobs']} jobs,"
        f" peak RSS {d['peak_rss_mb']} MB\n"
        f"    dagster definitions validate: {result['definitions_validate_seconds']:.2f} s "
        f"(peak RSS {result['definitions_validate_peak_rss_mb']} MB)\n"
        f"    tiny sync ({run['rows']} rows): run {run['run_seconds']:.2f} s, whole process "
        f"{run['command_seconds']:.2f} s, peak RSS {run['peak_rss_mb']['sync_process']} MB\n"
        + textwrap.indent(c.describe_stages(run), " " * 8),
        flush=True,
    )


VENV_DAGSTER = c.VENV_BIN / "dagster"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 500, 1000])
    parser.add_argument(
        "--repeat", type=int, default=1, help="measure each count this many times, keep the best"
    )
    parser.add_argument("--timeout", type=float, default=900, help="limit per process, s")
    args = parser.parse_args()
    info = c.machine()
    c.print_header("scale with integrations: definitions, code-location load, run overhead", info)
    started = time.perf_counter()
    day_start, day_end = partition_window()
    with (
        tempfile.TemporaryDirectory(prefix="hermes_bench_") as tmp,
        c.simulator(
            clients=TINY_CLIENTS,
            start=day_start + timedelta(hours=1),
            end=day_end - timedelta(hours=1),
        ) as sim,
        c.postgres_database("hermes_bench_scale") as database,
    ):
        results = [
            measure_count(count, sim, database, Path(tmp), args.repeat, args.timeout)
            for count in args.counts
        ]
    largest = results[-1]
    print()
    targets = [
        c.check_target(
            f"definitions build, s ({largest['integrations']:,} integrations: YAML + build)",
            largest["definitions"]["seconds"]["load_yaml_and_build"],
            3.0,
            at_most=True,
        ),
        c.check_target(
            f"fixed overhead of a sync run, s ({largest['integrations']:,} integrations: "
            "whole sync process of a tiny partition)",
            largest["sync_run"]["command_seconds"],
            3.0,
            at_most=True,
        ),
    ]
    return c.finish(NAME, info, {"counts": results}, targets=targets, started=started)


if __name__ == "__main__":
    raise SystemExit(main())
