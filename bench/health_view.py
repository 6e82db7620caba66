"""Health view: ``hermes-orchestration status`` over 500 integrations and 10,000 runs of history.

For each Dagster storage (SQLite files in a temporary DAGSTER_HOME, or a PostgreSQL database of
its own): two real template syncs against the simulator (one succeeds, one fails on a refused App
Token), then a history of ``--runs`` runs spread over ``--integrations`` integrations, copied from
the templates through the instance API (see ``_history.py``). Then, each ``--repeat`` times in a
fresh process: ``hermes-orchestration status`` and ``status --json`` (wall time and peak RSS), and
the library call ``health.integration_cards`` alone.

Making the history takes most of the time. ``--history-dir DIR`` keeps it (the SQLite home under
DIR, the PostgreSQL database until ``--forget``) so that later runs with the same DIR only time
the commands; without it everything is removed at the end.

    .venv/bin/python bench/health_view.py
    .venv/bin/python bench/health_view.py --history-dir /tmp/hermes_history   # keep, or reuse
    .venv/bin/python bench/health_view.py --history-dir /tmp/hermes_history --forget
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import _common as c
from sync_throughput import PARTITION, TIMEZONE, partition_window

NAME = "health_view"
PREFIX = "tienda_"
SUCCESS = f"{PREFIX}0000"
FAILURE = f"{PREFIX}0001"  # its token is refused: every template run of it fails
BAD_TOKEN_ENV = "HERMES_TOKEN_BENCH_REFUSED"
REFUSED_TOKEN = "a-token-the-site-does-not-know"  # answered 401 at once, never retried
MANIFEST = "history.json"


@dataclass
class History:
    """A Dagster instance holding a generated history, and what is needed to read it."""

    storage: str
    integrations: int
    runs: int
    home: str  # DAGSTER_HOME
    integrations_file: str
    database: str | None  # the PostgreSQL storage database, if any
    figures: dict[str, Any]  # how it was made
    code: str  # the checkout that made it

    def env(self) -> dict[str, str]:
        """The environment of a status command reading this history."""
        env = c.project_env(
            dagster_home=Path(self.home),
            integrations_file=Path(self.integrations_file),
            state_dir=Path(self.home).parent / "state",
            masterdata_database=None,
        )
        env[BAD_TOKEN_ENV] = REFUSED_TOKEN
        return env

    def save(self, folder: Path) -> None:
        """Write the manifest that lets a later run reuse this history."""
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, storage: str, integrations: int, runs: int) -> History | None:
        """The history kept in ``folder``, if it matches; None when it must be made."""
        path = folder / MANIFEST
        if not path.exists():
            return None
        kept = cls(**json.loads(path.read_text()))
        if (kept.storage, kept.integrations, kept.runs) != (storage, integrations, runs):
            raise SystemExit(
                f"{folder} holds a history of {kept.runs} runs over {kept.integrations} "
                f"integrations on {kept.storage}; use another --history-dir, or --forget it"
            )
        if kept.database and not c.database_exists(kept.database):
            raise SystemExit(f"the database {kept.database} of {folder} is gone; --forget it")
        return kept

    def drop(self) -> None:
        """Remove the PostgreSQL database (the folders go with their parent)."""
        if self.database:
            c.drop_database(self.database)


def integration_names(count: int) -> list[str]:
    """``tienda_0000`` .. ``tienda_<count-1>``."""
    return [f"{PREFIX}{index:04d}" for index in range(count)]


def status_available(env: dict[str, str]) -> bool:
    """Whether this checkout's CLI has the ``status`` command yet."""
    probe = subprocess.run(
        [str(c.CLI), "status", "--help"], env=env, capture_output=True, timeout=120, check=False
    )
    return probe.returncode == 0


def make_templates(env: dict[str, str], scratch: Path, timeout: float) -> tuple[str, str]:
    """Run the two template syncs for real; their run ids (success, failure)."""
    ok = c.run_measured(
        c.sync_command(SUCCESS, PARTITION), env=env, timeout=timeout, scratch=scratch
    ).check("the successful template sync")
    failed = c.run_measured(
        c.sync_command(FAILURE, PARTITION), env=env, timeout=timeout, scratch=scratch
    )
    if failed.returncode != 1:
        raise RuntimeError(f"the failing template sync should fail:\n{failed.stderr[-4000:]}")
    return c.last_json_line(ok.stdout)["run_id"], c.last_json_line(failed.stdout)["run_id"]


CHUNK_RUNS = 500  # runs copied by one worker process
CHUNK_ATTEMPTS = 3  # a chunk whose process is killed is resumed, this many times in all


def copy_templates(
    env: dict[str, str],
    home: Path,
    templates: tuple[str, str],
    args: argparse.Namespace,
    scratch: Path,
) -> dict[str, Any]:
    """Copy the templates into ``args.runs`` runs over ``args.integrations`` integrations:
    chunks of ``CHUNK_RUNS`` runs, ``args.workers`` processes at a time (see ``_history.py``)."""
    success_id, failure_id = templates
    # Partitions from the day after the templates' one, one per run of an integration.
    first = date.fromisoformat(PARTITION) + timedelta(days=1)
    command = [
        str(c.PYTHON), str(c.BENCH / "_history.py"), "--home", str(home),
        "--success-run", success_id, "--success-name", SUCCESS,
        "--failure-run", failure_id, "--failure-name", FAILURE,
        "--partition", PARTITION, "--prefix", PREFIX,
        "--integrations", str(args.integrations), "--runs", str(args.runs),
        "--first-partition", first.isoformat(), "--now", str(time.time()),
    ]  # fmt: skip
    started = time.perf_counter()
    progress: list[int] = [0]

    def chunk(first_slot: int) -> dict[str, Any]:
        slots = ["--first-slot", str(first_slot), "--last-slot", str(first_slot + CHUNK_RUNS)]
        for attempt in range(1, CHUNK_ATTEMPTS + 1):
            resume = ["--resume"] if attempt > 1 else []
            measured = c.run_measured(
                [*command, *slots, *resume], env=env, timeout=args.timeout, scratch=scratch
            )
            # Killed by a signal (negative status): resume the chunk in a new process.
            if measured.returncode >= 0 or attempt == CHUNK_ATTEMPTS:
                share = json.loads(measured.check("a history worker").stdout)
                progress[0] += share["runs"]
                print(
                    f"      {progress[0]:,} runs ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
                return {**share, "attempts": attempt, "peak_rss_mb": measured.peak_rss_mb}
            print(f"      a history worker was stopped ({measured.returncode}); resuming")
        raise AssertionError("unreachable")

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        shares = list(pool.map(chunk, range(0, args.runs, CHUNK_RUNS)))
    runs = sum(share["runs"] for share in shares) + 2  # the two templates are runs too
    stored = _runs_in(home)
    if stored != runs:
        raise RuntimeError(f"the history should hold {runs} runs, the instance holds {stored}")
    return {
        "runs": runs,
        "failed_runs": sum(share["failed_runs"] for share in shares) + 1,
        "events_per_success_run": shares[0]["events_per_success_run"],
        "events_per_failed_run": shares[0]["events_per_failed_run"],
        "workers": args.workers,
        "resumed_chunks": sum(share["attempts"] > 1 for share in shares),
        "seconds": round(time.perf_counter() - started, 1),
        "worker_peak_rss_mb": max(share["peak_rss_mb"] for share in shares),
    }


def _runs_in(home: Path) -> int:
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(home))
    try:
        return instance.get_runs_count()
    finally:
        instance.dispose()


def make_history(storage: str, site_url: str, folder: Path, args: argparse.Namespace) -> History:
    """Template syncs and their copies, in a new Dagster instance under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [
        c.integration_entry(
            name,
            site_url=site_url,
            app_token_env=BAD_TOKEN_ENV if name == FAILURE else c.TOKEN_ENV,
        )
        for name in integration_names(args.integrations)
    ]
    yaml = c.write_integrations(folder / "integrations.yaml", entries, TIMEZONE)
    home = folder / "dagster_home"
    database = c.create_database("hermes_bench_dagster") if storage == "postgresql" else None
    history = History(
        storage, args.integrations, args.runs, str(home), str(yaml), database, {}, c.code_version()
    )
    try:
        # SQLite storage syncs every write to disk: the history is written in memory (tmpfs)
        # and then copied to disk, where the status command reads it.
        with tempfile.TemporaryDirectory(prefix="hermes_bench_", dir=_memory_dir()) as memory:
            making = Path(memory) / "dagster_home" if storage == "sqlite" else home
            c.write_dagster_yaml(making, postgres_database=database)
            env = {**history.env(), "DAGSTER_HOME": str(making)}
            print(f"\n-- {storage} storage: template syncs ...", flush=True)
            templates = make_templates(env, folder / "out", args.timeout)
            print(
                f"   copying {args.runs:,} runs over {args.integrations} integrations with "
                f"{args.workers} processes ...",
                flush=True,
            )
            history.figures = copy_templates(env, making, templates, args, folder / "out")
            if making != home:
                shutil.copytree(making, home)
    except BaseException:
        history.drop()
        raise
    figures = history.figures
    print(
        f"   history: {figures['runs']:,} runs ({figures['failed_runs']:,} failed), "
        f"{figures['events_per_success_run']} / {figures['events_per_failed_run']} events per "
        f"successful / failed run, made in {figures['seconds']:.0f} s",
        flush=True,
    )
    return history


def _memory_dir() -> str | None:
    return "/dev/shm" if Path("/dev/shm").is_dir() else None


def time_commands(
    env: dict[str, str], scratch: Path, repeat: int, timeout: float
) -> dict[str, Any]:
    """``status``, ``status --json`` and the library call, each ``repeat`` times."""
    figures: dict[str, Any] = {}
    library = [
        json.loads(
            c.run_measured(
                [str(c.PYTHON), str(c.BENCH / "_status_probe.py")],
                env=env,
                timeout=timeout,
                scratch=scratch,
            )
            .check("the integration_cards probe")
            .stdout
        )
        for _ in range(repeat)
    ]
    cards = [run["seconds"]["integration_cards"] for run in library]
    figures["integration_cards"] = {
        "seconds": cards,
        "median_seconds": round(statistics.median(cards), 3),
        "warm_second_call_seconds": [run["seconds"]["integration_cards_again"] for run in library],
        "health": library[0]["health"],
    }
    if not status_available(env):
        figures["status_command"] = "not available yet in this checkout"
        return figures
    for label, extra in (("status", []), ("status_json", ["--json"])):
        runs = [
            c.run_measured(
                [str(c.CLI), "status", *extra], env=env, timeout=timeout, scratch=scratch
            )
            for _ in range(repeat)
        ]
        for run in runs:
            # status may exit 1 when some integration is unhealthy; only a crash is an error.
            if run.returncode not in (0, 1):
                run.check(f"hermes-orchestration status {' '.join(extra)}")
        seconds = [round(run.seconds, 2) for run in runs]
        figures[label] = {
            "seconds": seconds,
            "median_seconds": round(statistics.median(seconds), 2),
            "exit_status": runs[-1].returncode,
            "peak_rss_mb": max(run.peak_rss_mb for run in runs),
            "output_lines": len(runs[-1].stdout.splitlines()),
        }
    return figures


def bench_storage(
    storage: str, site_url: Callable[[], str], root: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The history of one kind of storage (kept, reused or temporary) and the timings on it."""
    kept_in = Path(args.history_dir) / storage if args.history_dir else None
    history = History.load(kept_in, storage, args.integrations, args.runs) if kept_in else None
    reused = history is not None
    if history is None:
        history = make_history(storage, site_url(), kept_in or root / storage, args)
        if kept_in:
            history.save(kept_in)
    else:
        print(f"\n-- {storage} storage: reusing the history kept in {kept_in}", flush=True)
    try:
        load = c.load_average()
        timings = time_commands(history.env(), root / "out", args.repeat, args.timeout)
    finally:
        if not kept_in:
            history.drop()
    result = {
        "storage": storage,
        "history": history.figures,
        "history_reused": reused,
        "history_code": history.code,
        "load_average": load,
        **timings,
    }
    print_storage(result)
    return result


def print_storage(result: dict[str, Any]) -> None:
    """One storage's figures."""
    cards = result["integration_cards"]
    print(
        f"   integration_cards (library call alone): median {cards['median_seconds']:.2f} s of "
        f"{cards['seconds']}; warm second call {cards['warm_second_call_seconds']}; "
        f"health {cards['health']} (load {result['load_average']})"
    )
    for label in ("status", "status_json"):
        figures = result.get(label)
        if isinstance(figures, dict):
            print(
                f"   hermes-orchestration {label.replace('_json', ' --json')}: median "
                f"{figures['median_seconds']:.2f} s of {figures['seconds']} (whole command), peak "
                f"RSS {figures['peak_rss_mb']} MB, exit {figures['exit_status']}, "
                f"{figures['output_lines']} lines"
            )
    if isinstance(result.get("status_command"), str):
        print(f"   hermes-orchestration status: {result['status_command']}")


def forget(history_dir: Path) -> None:
    """Drop the kept PostgreSQL databases and remove ``history_dir``."""
    for manifest in history_dir.glob(f"*/{MANIFEST}"):
        database = json.loads(manifest.read_text()).get("database")
        if database:
            c.drop_database(database)
            print(f"dropped database {database}")
    shutil.rmtree(history_dir, ignore_errors=True)
    print(f"removed {history_dir}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--integrations", type=int, default=500)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument(
        "--storage", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"]
    )
    parser.add_argument("--repeat", type=int, default=3, help="timings per command (median)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 2, help="processes writing the history"
    )
    parser.add_argument(
        "--history-dir", default=None, help="keep the history here, or reuse the one kept here"
    )
    parser.add_argument(
        "--forget", action="store_true", help="drop the history kept in --history-dir and stop"
    )
    parser.add_argument("--timeout", type=float, default=900, help="limit per process, s")
    args = parser.parse_args()
    if args.integrations < 2:
        parser.error("--integrations must be at least 2 (one template succeeds, one fails)")
    if args.forget:
        if not args.history_dir:
            parser.error("--forget needs --history-dir")
        forget(Path(args.history_dir))
        return 0
    info = c.machine()
    c.print_header("health view: status over many integrations and runs", info)
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="hermes_bench_") as tmp,
        contextlib.ExitStack() as stack,
    ):
        simulators: list[c.Simulator] = []

        def site_url() -> str:
            # Started only when a history has to be made.
            if not simulators:
                day_start, day_end = partition_window()
                simulators.append(
                    stack.enter_context(
                        c.simulator(
                            clients=20,
                            start=day_start + timedelta(hours=1),
                            end=day_end - timedelta(hours=1),
                        )
                    )
                )
            return simulators[0].url

        results = [bench_storage(storage, site_url, Path(tmp), args) for storage in args.storage]
    print()
    targets = [
        c.check_target(
            f"hermes-orchestration status, s ({result['storage']}, median, whole command)",
            result["status"]["median_seconds"],
            2.0,
            at_most=True,
        )
        for result in results
        if isinstance(result.get("status"), dict)
    ]
    return c.finish(NAME, info, {"storages": results}, targets=targets, started=started)


if __name__ == "__main__":
    raise SystemExit(main())
