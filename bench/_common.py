"""Shared parts of the benchmarks: the machine, the simulator, PostgreSQL, Dagster homes, memory.

Every benchmark starts what it needs itself and removes it afterwards: the bundled simulator as a
separate process group, a PostgreSQL database of its own on 127.0.0.1:5432, temporary folders.
Peak memory is read from the kernel: ``ru_maxrss`` of a reaped child (exact), ``VmHWM`` of a
process that is still running.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
CLI = VENV_BIN / "hermes-orchestration"

# The simulator's App Token for every benchmark (it is a loopback simulator, not a secret).
TOKEN = "bench-token-4b1c9e"
TOKEN_ENV = "HERMES_TOKEN_BENCH"

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_ADMIN_DB = "postgres"

MB = 1024 * 1024


# --- The machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what platform knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


def machine() -> dict[str, Any]:
    """Cores, RAM, CPU model, load and software versions, to print next to every figure."""
    import dagster

    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        postgres = row[0] if row else "unknown"
    return {
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "cpu": cpu_model(),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "dagster": dagster.__version__,
        "postgresql": postgres,
        "code": code_version(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def code_version() -> str:
    """The checkout measured: its commit, and how many package files differ from it."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=30
        )
        return result.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "hermes_orchestration").splitlines()
    return f"{commit} + {len(changed)} changed files in hermes_orchestration/"


def reproduce_command() -> str:
    """The exact command that reproduces this run, from the repository root."""
    script = Path(sys.argv[0]).resolve().relative_to(REPO)
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def print_header(title: str, info: Mapping[str, Any]) -> None:
    """The title, the machine and the command, before any figure."""
    print(f"== {title}")
    print(
        f"machine: {info['cores']} cores, {info['ram_gb']} GB RAM, {info['cpu']}; "
        f"load {info['load_average_at_start']} at start"
    )
    print(
        f"software: Python {info['python']}, Dagster {info['dagster']}, "
        f"PostgreSQL {info['postgresql']}; code {info['code']}"
    )
    print(f"command: {reproduce_command()}", flush=True)


def finish(
    name: str,
    info: Mapping[str, Any],
    figures: Mapping[str, Any],
    *,
    targets: Any = None,
    started: float | None = None,
    file_name: str | None = None,
) -> int:
    """Write a benchmark's results to ``bench/results/<file_name or name>.json``: the figures,
    with the machine, the command and (when given) the targets checked and the time since
    ``started``. Says where; returns the exit status, 0."""
    data: dict[str, Any] = {"benchmark": name}
    if targets is not None:
        data["targets"] = targets
    data.update(command=reproduce_command(), machine=info)
    if started is not None:
        data["load_average_at_end"] = load_average()
        data["total_seconds"] = round(time.perf_counter() - started, 1)
    data.update(figures)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{file_name or name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nresults: {path.relative_to(REPO)}")
    return 0


def rate(rows: int, seconds: float) -> float:
    """Rows per second, 0 for an empty interval."""
    return rows / seconds if seconds > 0 else 0.0


# --- Memory -----------------------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmHWM is the peak RSS so far); None once gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


@dataclass
class BackendPeak:
    """Peak memory of one PostgreSQL backend process serving a benchmark database."""

    pid: int
    database: str
    peak_rss_kb: int = 0  # VmHWM: includes the shared buffers the backend touched
    peak_private_kb: int = 0  # max RssAnon seen: the backend's own memory (sorts, hashes)


# A backend's title: "postgres: [<cluster>: ]<user> <database> <client> <state>".
_BACKEND_TITLE = re.compile(r"postgres: (?:\S+: )?\S+ (\S+) \S+\(\d+\)")


class BackendWatch:
    """Polls the PostgreSQL backends connected to some databases and keeps their peak memory.

    A backend exits with its connection, so it is polled while it lives; VmHWM never decreases,
    so the last reading is within one polling interval of the true peak.
    """

    def __init__(self, databases: Sequence[str], interval: float = 0.25) -> None:
        self._databases = tuple(databases)
        self._interval = interval
        self._peaks: dict[int, BackendPeak] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pg-backend-watch", daemon=True)

    def __enter__(self) -> BackendWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self._interval)

    def poll(self) -> None:
        """Read the memory of every backend of the watched databases once."""
        for proc in psutil.process_iter(["name", "cmdline"]):
            match = _BACKEND_TITLE.match(" ".join(proc.info.get("cmdline") or []))
            if not match or match.group(1) not in self._databases:
                continue
            database = match.group(1)
            peak = self._peaks.setdefault(proc.pid, BackendPeak(proc.pid, database))
            hwm = proc_status_kb(proc.pid, "VmHWM")
            anon = proc_status_kb(proc.pid, "RssAnon")
            if hwm is not None:
                peak.peak_rss_kb = max(peak.peak_rss_kb, hwm)
            if anon is not None:
                peak.peak_private_kb = max(peak.peak_private_kb, anon)

    def summary(self) -> dict[str, Any]:
        """Backends seen, and the largest peak RSS and private memory among them, in MB."""
        peaks = list(self._peaks.values())
        return {
            "backends_seen": len(peaks),
            "peak_rss_mb": round(max((p.peak_rss_kb for p in peaks), default=0) / 1024, 1),
            "peak_private_mb": round(max((p.peak_private_kb for p in peaks), default=0) / 1024, 1),
        }


@dataclass
class Measured:
    """A finished child process: exit status, wall time, exact peak RSS, output."""

    command: list[str]
    returncode: int
    seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str

    def check(self, what: str) -> Measured:
        """Raise with the child's output if it failed."""
        if self.returncode != 0:
            raise RuntimeError(
                f"{what} failed with exit status {self.returncode}: {shlex.join(self.command)}\n"
                f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-8000:]}"
            )
        return self


def run_measured(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    cwd: Path = REPO,
    scratch: Path,
) -> Measured:
    """Run ``command`` to completion and measure it: wall time and the peak RSS of the process.

    The peak comes from ``wait4``'s rusage (``ru_maxrss``), the kernel's exact high-water mark of
    the child. The child gets its own process group, killed whole on timeout.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    out_path, err_path = scratch / f"{tag}.out", scratch / f"{tag}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(command), env=dict(env), cwd=cwd, stdout=out, stderr=err, start_new_session=True
        )
        deadline = started + timeout
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{shlex.join(command)} ran over {timeout:.0f} s")
                time.sleep(0.02)
        except BaseException:
            kill_group(proc)
            raise
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        command=list(command),
        returncode=proc.returncode,
        seconds=seconds,
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def run_parallel(
    commands: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str],
    timeout: float,
    scratch: Path,
) -> list[Measured]:
    """Run ``commands`` at the same time, each measured as by ``run_measured``."""
    results: list[Measured | BaseException | None] = [None] * len(commands)

    def run(index: int) -> None:
        try:
            results[index] = run_measured(
                commands[index], env=env, timeout=timeout, scratch=scratch
            )
        except BaseException as err:  # re-raised below, in the caller's thread
            results[index] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(commands))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [result for result in results if isinstance(result, Measured)]


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """Stop a child started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# --- The simulator ----------------------------------------------------------------------------


@dataclass
class Simulator:
    """A running ``hermes-orchestration simulate`` process."""

    process: subprocess.Popen[bytes]
    url: str
    versions: int  # client versions the site lists (a client may have several)
    startup_seconds: float
    peak_rss_mb: float = field(default=0.0)

    def read_peak(self) -> float:
        """The simulator's peak RSS so far, in MB (kept after it stops)."""
        hwm = proc_status_kb(self.process.pid, "VmHWM")
        if hwm is not None:
            self.peak_rss_mb = round(hwm / 1024, 1)
        return self.peak_rss_mb


_SIM_BANNER = re.compile(rb"Hermes simulator: (\d+) client versions at (http://\S+) ")


@contextlib.contextmanager
def simulator(
    *,
    clients: int,
    start: datetime,
    end: datetime,
    seed: int = 7,
    dirty_share: float | None = None,
    latency: float = 0.0,
    timeout: float = 600.0,
) -> Iterator[Simulator]:
    """Start the bundled simulator on a free port in its own process group; stop it afterwards.
    ``latency``: seconds the site waits before each answer (a site across a network)."""
    command = [
        str(CLI),
        "simulate",
        "--port",
        "0",
        "--clients",
        str(clients),
        "--seed",
        str(seed),
        "--start",
        start.isoformat(),
        "--end",
        end.isoformat(),
        "--token",
        TOKEN,
    ]
    if dirty_share is not None:
        command += ["--dirty-share", str(dirty_share)]
    if latency:
        command += ["--latency", str(latency)]
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        banner = _wait_for_banner(proc, timeout)
        sim = Simulator(
            process=proc,
            url=banner.group(2).decode(),
            versions=int(banner.group(1)),
            startup_seconds=time.perf_counter() - started,
        )
        # Keep draining its output so that a chatty simulator never blocks on a full pipe.
        threading.Thread(target=_drain, args=(proc,), daemon=True).start()
        yield sim
        sim.read_peak()
    finally:
        kill_group(proc)


def _wait_for_banner(proc: subprocess.Popen[bytes], timeout: float) -> re.Match[bytes]:
    assert proc.stdout is not None
    seen: list[bytes] = []
    result: list[re.Match[bytes]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            match = _SIM_BANNER.search(line)
            if match:
                result.append(match)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise RuntimeError(
            f"the simulator did not start within {timeout:.0f} s; its output:\n"
            + b"".join(seen).decode(errors="replace")
        )
    return result[0]


def _drain(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    with contextlib.suppress(ValueError, OSError):
        for _ in proc.stdout:
            pass


# --- PostgreSQL -------------------------------------------------------------------------------


def admin_dsn(database: str = PG_ADMIN_DB) -> str:
    """A libpq connection string for ``database`` on the local server."""
    return f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={database}"


def sqlalchemy_url(database: str) -> str:
    """The SQLAlchemy URL of ``database`` on the local server (psycopg 3)."""
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def dagster_storage_url(database: str) -> str:
    """The URL of ``database`` for Dagster's storage: dagster-postgres speaks psycopg2, and
    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, so the driver is named."""
    return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def create_database(prefix: str) -> str:
    """Create a fresh database named ``<prefix>_<random>`` and return its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(name: str) -> None:
    """Drop a database made by ``create_database``, closing its connections."""
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def database_exists(name: str) -> bool:
    """Whether the local server has a database ``name``."""
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh database of this benchmark's own, dropped afterwards whatever happens."""
    name = create_database(prefix)
    try:
        yield name
    finally:
        drop_database(name)


# --- Dagster and the project ------------------------------------------------------------------


def write_dagster_yaml(home: Path, *, postgres_database: str | None = None) -> Path:
    """A DAGSTER_HOME with SQLite storage, or PostgreSQL storage in ``postgres_database``."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["telemetry:", "  enabled: false"]
    if postgres_database:
        lines += [
            "storage:",
            "  postgres:",
            f"    postgres_url: {dagster_storage_url(postgres_database)}",
        ]
    path = home / "dagster.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return home


def integration_entry(
    name: str,
    *,
    site_url: str,
    master_database: str = "clientes_bench",
    start: str = "2026-11-01",
    page_size: int = 1000,
    max_requests_per_second: float = 1000,
    app_token_env: str = TOKEN_ENV,
) -> str:
    """One ``integrations:`` entry of the YAML (as text)."""
    return (
        f"  - name: {name}\n"
        f"    site_url: {site_url}\n"
        f"    app_token_env: {app_token_env}\n"
        f"    master_database: {master_database}\n"
        f"    partitions: {{granularity: daily, start: {start}}}\n"
        f"    page_size: {page_size}\n"
        f"    max_requests_per_second: {max_requests_per_second:g}\n"
        # The simulator's dirty share rejects a few percent; the check must not stop the load.
        f"    max_reject_ratio: 0.5\n"
    )


def write_integrations(path: Path, entries: Sequence[str], timezone: str) -> Path:
    """An integrations.yaml with ``entries`` in ``timezone``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"defaults:\n  timezone: {timezone}\nintegrations:\n" + "".join(entries)
    path.write_text(text, encoding="utf-8")
    return path


def project_env(
    *,
    dagster_home: Path,
    integrations_file: Path,
    state_dir: Path,
    masterdata_database: str | None,
) -> dict[str, str]:
    """The environment of a sync process: its Dagster home, YAML, state and master database."""
    env = dict(os.environ)
    env.update(
        {
            "DAGSTER_HOME": str(dagster_home),
            "HERMES_INTEGRATIONS_FILE": str(integrations_file),
            "HERMES_STATE_DIR": str(state_dir),
            TOKEN_ENV: TOKEN,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if masterdata_database:
        env["HERMES_MASTERDATA_URL"] = sqlalchemy_url(masterdata_database)
    else:
        env.pop("HERMES_MASTERDATA_URL", None)
    return env


_RUN_LINE = re.compile(r"run ([0-9a-f-]{36}) succeeded")


def run_id_from(output: str) -> str:
    """The run id printed by ``hermes-orchestration sync``."""
    match = _RUN_LINE.search(output)
    if not match:
        raise RuntimeError(f"no run id in the sync's output:\n{output[-2000:]}")
    return match.group(1)


def run_report(dagster_home: Path, run_id: str) -> dict[str, Any]:
    """Duration of a finished run and of each step, and the metadata of its materializations."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        stats = instance.get_run_stats(run_id)
        step_stats = instance.get_run_step_stats(run_id)
        steps = {
            step.step_key: round((step.end_time or 0) - (step.start_time or 0), 3)
            for step in step_stats
        }
        windows = {step.step_key: (step.start_time or 0, step.end_time or 0) for step in step_stats}
        records = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        metadata: dict[str, dict[str, Any]] = {}
        for record in records:
            event = record.get_dagster_event()
            materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
            name = materialization.asset_key.path[-1]
            metadata[name] = {
                key: value.value
                for key, value in materialization.metadata.items()
                if isinstance(value.value, int | float | str)
            }
        return {
            "run_seconds": round((stats.end_time or 0) - (stats.start_time or 0), 3),
            "steps_seconds": steps,
            "steps_windows": windows,
            "run_window": (stats.start_time or 0, stats.end_time or 0),
            "metadata": metadata,
        }
    finally:
        instance.dispose()


def peak_rss_by_step(
    samples: Sequence[Sequence[float]], report: Mapping[str, Any]
) -> dict[str, float]:
    """The highest sampled RSS (MB) before the run, in each step, and in the run overall."""

    def peak(start: float, end: float) -> float:
        # A step shorter than the sampling interval still gets the sample nearest to it.
        inside = [rss for t, rss in samples if start <= t <= end]
        if inside:
            return max(inside)
        nearest = min(samples, key=lambda sample: abs(sample[0] - start), default=(0.0, 0.0))
        return nearest[1]

    run_start, run_end = report["run_window"]
    peaks = {"before_run": peak(0, run_start)}
    for key, (start, end) in report["steps_windows"].items():
        peaks[key.split("__")[-1]] = peak(start, end)
    peaks["whole_run"] = peak(run_start, run_end)
    return peaks


def sync_command(
    name: str, partition: str, last: str | None = None, *, sql_timing: bool = False
) -> list[str]:
    """The measured sync process: ``launch.sync_now`` as the CLI calls it, with stage timings."""
    command = [str(PYTHON), str(BENCH / "_sync_probe.py"), name, "--partition", partition]
    if last:
        command += ["--to", last]
    if sql_timing:
        command.append("--sql-timing")
    return command


def measure_sync(
    *,
    name: str,
    partition: str,
    last: str | None = None,
    env: Mapping[str, str],
    dagster_home: Path,
    scratch: Path,
    databases: Sequence[str],
    timeout: float,
    what: str,
    sql_timing: bool = False,
    prefix: Sequence[str] = (),
) -> dict[str, Any]:
    """Run one sync as a measured process; its figures, stage timings and the run's report.

    With ``sql_timing``, the slowest PostgreSQL statements are reported too (under ``sql``).
    ``prefix`` runs the sync under another command (a profiler: ``py-spy record ... --``).
    """
    with BackendWatch(databases) as watch:
        measured = run_measured(
            [*prefix, *sync_command(name, partition, last, sql_timing=sql_timing)],
            env=env,
            timeout=timeout,
            scratch=scratch,
        )
    measured.check(what)
    probe = last_json_line(measured.stdout)
    report = run_report(dagster_home, probe["run_id"])
    rows = int(report["metadata"]["raw_clients"]["rows_fetched"])
    return {
        "rows": rows,
        "run_id": probe["run_id"],
        "command_seconds": round(measured.seconds, 2),
        "run_seconds": report["run_seconds"],
        "run_rows_per_second": round(rate(rows, report["run_seconds"])),
        "command_rows_per_second": round(rate(rows, measured.seconds)),
        "stages_seconds": probe["seconds"],
        "outside_run_seconds": probe["outside_run_seconds"],
        "steps_seconds": report["steps_seconds"],
        "peak_rss_mb": {
            "sync_process": measured.peak_rss_mb,
            "sync_process_by_step": peak_rss_by_step(probe["rss_samples"], report),
            "postgres": watch.summary(),
        },
        "metadata": report["metadata"],
        **({"sql": probe["sql"]} if "sql" in probe else {}),
    }


def describe_sql(sql: Mapping[str, Any], width: int = 110) -> str:
    """The statements reported by ``--sql-timing``: the total, then the slowest, one a line."""
    lines = [f"all statements: {sql['total_calls']} in {sql['total_seconds']:.2f} s; slowest:"]
    lines += [
        f"{s['seconds']:7.2f} s {s['calls']:>6}x  {s['statement'][:width]}" for s in sql["top"]
    ]
    return "\n".join(lines)


def last_json_line(output: str) -> dict[str, Any]:
    """The last line of ``output`` that holds a JSON object (tools may print after it)."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"no JSON object in the output:\n{output[-2000:]}")


def describe_stages(figures: Mapping[str, Any]) -> str:
    """The sync process's stages and the run's steps, on one line each."""
    s = figures["stages_seconds"]
    by_step = ", ".join(
        f"{name} {mb:.0f}" for name, mb in figures["peak_rss_mb"]["sync_process_by_step"].items()
    )
    steps = ", ".join(
        f"{key.split('__')[-1]} {seconds:.2f}" for key, seconds in figures["steps_seconds"].items()
    )
    return (
        f"process: imports {s['imports']:.2f} s, "
        f"definitions module {s['definitions_module_import']:.2f} s, "
        f"YAML {s['load_yaml']:.2f} s, "
        f"build {s['build_definitions']:.2f} s, "
        f"resolve job {s['resolve_job']:.2f} s, "
        f"sync_now {s['sync_now']:.2f} s "
        f"(outside the run {figures['outside_run_seconds']:.2f} s), "
        f"interpreter start and exit {figures['command_seconds'] - s['total']:.2f} s\n"
        f"run steps (s): {steps}\n"
        f"sync process peak RSS by step (MB, sampled every 50 ms): {by_step}"
    )


def check_target(label: str, value: float, target: float, *, at_most: bool = False) -> dict:
    """Print whether ``value`` meets a target of the project (at least, or at most, ``target``)."""
    met = value <= target if at_most else value >= target
    sign = "<=" if at_most else ">="
    print(f"target {label}: {value:,.2f} {sign} {target:,.2f}? {'met' if met else 'NOT MET'}")
    return {"label": label, "value": value, "target": target, "at_most": at_most, "met": met}
