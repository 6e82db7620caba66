"""The full Dagster stack on 127.0.0.1, run as production runs it, for the stack and UI tests.

Four processes, each leading its own process group so that stopping it also stops its children
(the run workers that the code server starts):

- the bundled Hermes simulator (``hermes-orchestration simulate``),
- the code server (``dagster api grpc -m hermes_orchestration.definitions``),
- ``dagster-webserver`` and ``dagster-daemon run``, both loading ``deploy/workspace.yaml``,

all with the project's production instance (``dagster.yaml``) on a PostgreSQL database of their
own, and the master data in a second one. Both databases are created here and dropped on stop;
``dagster instance migrate`` creates Dagster's schema, as a deployment does.

One stack serves the whole session: test modules load this file as a plugin
(``pytest_plugins = ["hermes_orchestration_tests.stack"]``) and take the ``dagster_stack``
fixture; the stack stops after the last test that uses it (or at the end of the session). The
processes' logs are kept under ``test-artifacts/stack/``.

PYTEST_DONT_REWRITE: the test modules import this file before pytest loads it as a plugin, too
late for assertion rewriting; its failures are StackErrors that carry the processes' logs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import httpx
import pytest
import sqlalchemy as sa

from hermes_orchestration.simulator import SimulatorConfig
from hermes_orchestration_tests.conftest import POSTGRES_ADMIN_URL

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
BIN = Path(sys.executable).parent

LOCATION = "hermes_orchestration"
REPOSITORY = "__repository__"
ZONE = ZoneInfo("America/Santiago")

# The stack's integrations: one the schedule syncs every minute, one left to hand launches and
# backfills, and one switched off in the YAML.
SCHEDULED = "tienda_norte"
MANUAL = "tienda_sur"
DISABLED = "tienda_pausada"
INTEGRATIONS = (SCHEDULED, MANUAL, DISABLED)
MASTER_DATABASES = {SCHEDULED: "clientes_norte", MANUAL: "clientes_sur", DISABLED: "clientes_sur"}
PARTITION_DAYS = 7  # the partitions start this many days before today

TOKEN = "hrm_live_stack_5Vb8Qw2Ze7Ry4Tn1"
TOKEN_ENV = "HERMES_TOKEN_STACK"

STARTUP_TIMEOUT = 150.0
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 40

T = TypeVar("T")


class StackError(AssertionError):
    """The stack did not do what a test waited for; the message holds the processes' logs."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ManagedProcess:
    """A process of the stack, leading its own process group, with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls, name: str, args: Sequence[str | Path], *, env: dict[str, str], log_dir: Path
    ) -> ManagedProcess:
        log_path = log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [str(arg) for arg in args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Dagster's processes ignore SIGTERM unless they lead their own group; the group
                # also holds their children (run workers, code servers), stopped with them.
                start_new_session=True,
            )
        return cls(name=name, popen=popen, log_path=log_path)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process's whole group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stopped(self) -> bool:
        """Whether the process and everything in its group has exited (and is reaped)."""
        self.popen.poll()
        return not _group_exists(self.popen.pid)

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def stop_processes(processes: Sequence[ManagedProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to every process group at once, then SIGKILL to what is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(p.stopped() for p in processes):
            time.sleep(0.1)
        if all(process.stopped() for process in processes):
            break
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(timeout=1)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # The leader may be a zombie we have not reaped; a group of zombies only is gone in practice.
    return not _only_zombies(pgid)


def _only_zombies(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return False
    return True


@dataclass
class Stack:
    """A running stack: addresses, environment, databases, and helpers to query it."""

    work: Path
    log_dir: Path
    env: dict[str, str]
    dagster_db: str
    masterdata_db: str
    webserver_url: str = ""
    simulator_url: str = ""
    first_day: date = field(default_factory=date.today)
    simulator_config: SimulatorConfig | None = None
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    stopped: bool = False

    # -- diagnostics ------------------------------------------------------------------------

    def explain(self, what: str) -> str:
        """``what``, followed by the state and the log tail of every process."""
        parts = [what]
        for process in self.processes.values():
            state = "running" if process.alive() else f"exited {process.popen.returncode}"
            parts.append(f"--- {process.name} ({state}), {process.log_path}:\n{process.tail()}")
        return "\n".join(parts)

    def wait_for(
        self, what: str, probe: Callable[[], T | None], timeout: float, interval: float = 1.0
    ) -> T:
        """Poll ``probe`` until it returns something other than None; fail with the logs.

        A StackError raised by ``probe`` fails at once; connection errors are retried.
        """
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            dead = [p.name for p in self.processes.values() if not p.alive()]
            if dead:
                raise StackError(self.explain(f"{', '.join(dead)} exited while waiting for {what}"))
            try:
                result = probe()
            except (httpx.HTTPError, OSError) as err:  # not up yet, or restarting
                result, last_error = None, err
            if result is not None:
                return result
            if time.monotonic() > deadline:
                detail = f" (last error: {last_error})" if last_error else ""
                raise StackError(self.explain(f"timed out after {timeout:.0f}s: {what}{detail}"))
            time.sleep(interval)

    # -- GraphQL ----------------------------------------------------------------------------

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        """Run a GraphQL query against the webserver; its ``data``, or a StackError."""
        response = httpx.post(
            f"{self.webserver_url}/graphql",
            json={"query": query, "variables": variables},
            timeout=30,
        )
        body = response.json() if response.content else {}
        if response.status_code != 200 or body.get("errors"):
            raise StackError(f"GraphQL answered {response.status_code}: {body.get('errors', body)}")
        return body["data"]

    def runs(self, tags: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Runs of the instance (newest first), optionally those with all of ``tags``."""
        filter_ = {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}
        data = self.graphql(RUNS_QUERY, filter=filter_)
        result = data["runsOrError"]
        if result["__typename"] != "Runs":
            raise StackError(f"runs query failed: {result}")
        return [_flatten_tags(run) for run in result["results"]]

    def run(self, run_id: str) -> dict[str, Any]:
        """One run, with its tags as a dict."""
        result = self.graphql(RUN_QUERY, runId=run_id)["runOrError"]
        if result["__typename"] != "Run":
            raise StackError(f"run {run_id}: {result}")
        return _flatten_tags(result)

    def wait_for_runs_to_finish(self, run_ids: Sequence[str], timeout: float) -> list[dict]:
        """Wait until every run has finished; the runs, whatever their outcome."""

        def finished() -> list[dict] | None:
            runs = [self.run(run_id) for run_id in run_ids]
            return runs if all(run["status"] in FINISHED for run in runs) else None

        return self.wait_for(f"runs {', '.join(run_ids)} to finish", finished, timeout, 2.0)

    def wait_for_materialization(self, path: Sequence[str], timeout: float) -> str:
        """Wait until the asset at ``path`` has been materialized once; the run that did it."""

        def latest() -> str | None:
            asset = self.graphql(LATEST_MATERIALIZATION_QUERY, path=list(path))["assetOrError"]
            found = asset.get("assetMaterializations") or []
            return found[0]["runId"] if found else None

        return self.wait_for(f"a materialization of {'/'.join(path)}", latest, timeout, 2.0)

    # -- master data and command line -------------------------------------------------------

    @property
    def masterdata_url(self) -> str:
        return self.env["HERMES_MASTERDATA_URL"]

    def masterdata(self, query: str, **params: object) -> list[tuple]:
        """Rows of a query against the stack's master database."""
        engine = sa.create_engine(self.masterdata_url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(sa.text(query), params)]
        finally:
            engine.dispose()

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``hermes-orchestration ARGS`` with the stack's environment."""
        return subprocess.run(
            [str(BIN / "hermes-orchestration"), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def partition_key(self, days_after_first: int) -> str:
        """The daily partition ``days_after_first`` days after the first one."""
        return (self.first_day + timedelta(days=days_after_first)).isoformat()

    def window(self, partition_key: str) -> tuple[datetime, datetime]:
        """The [start, end) instants of a daily partition, in the integrations' time zone."""
        day = date.fromisoformat(partition_key)
        start = datetime(day.year, day.month, day.day, tzinfo=ZONE)
        return start, start + timedelta(days=1)

    # -- life cycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process and its children, then drop both databases."""
        if self.stopped:
            return
        self.stopped = True
        stop_processes(list(self.processes.values()))
        _drop_databases(self.dagster_db, self.masterdata_db)


FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}

RUN_FIELDS = """
    runId status jobName startTime endTime creationTime
    assetSelection { path }
    tags { key value }
"""
RUNS_QUERY = f"""
query Runs($filter: RunsFilter) {{
  runsOrError(filter: $filter) {{
    __typename
    ... on Runs {{ results {{ {RUN_FIELDS} }} }}
    ... on PythonError {{ message }}
  }}
}}
"""
RUN_QUERY = f"""
query Run($runId: ID!) {{
  runOrError(runId: $runId) {{
    __typename
    ... on Run {{ {RUN_FIELDS} }}
    ... on PythonError {{ message }}
    ... on RunNotFoundError {{ message }}
  }}
}}
"""
LATEST_MATERIALIZATION_QUERY = """
query Latest($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    __typename
    ... on Asset { assetMaterializations(limit: 1) { runId } }
  }
}
"""
LOCATION_QUERY = """
query Location {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
    ... on PythonError { message }
  }
}
"""
DAEMONS_QUERY = """
query Daemons {
  instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } }
}
"""
REQUIRED_DAEMONS = {"SCHEDULER", "SENSOR", "QUEUED_RUN_COORDINATOR", "BACKFILL"}


def _flatten_tags(run: dict[str, Any]) -> dict[str, Any]:
    return {**run, "tags": {tag["key"]: tag["value"] for tag in run.get("tags", [])}}


# -- databases ------------------------------------------------------------------------------


def _admin_engine() -> sa.Engine:
    return sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")


def _create_databases(*names: str) -> None:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


def _drop_databases(*names: str) -> None:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


# -- starting -------------------------------------------------------------------------------


def integrations_yaml(simulator_url: str, first_day: date) -> str:
    """The stack's integrations file, all three pointing at the simulator."""
    return textwrap.dedent(
        f"""\
        defaults:
          timezone: America/Santiago
          partitions: {{granularity: daily, start: {first_day.isoformat()}}}
          site_url: {simulator_url}
          app_token_env: {TOKEN_ENV}
          page_size: 500
          max_requests_per_second: 200
          max_reject_ratio: 0.5
        integrations:
          - name: {SCHEDULED}
            display_name: Tienda Norte
            master_database: {MASTER_DATABASES[SCHEDULED]}
            schedule: "* * * * *"
          - name: {MANUAL}
            display_name: Tienda Sur
            master_database: {MASTER_DATABASES[MANUAL]}
            schedule: "0 4 * * *"
          - name: {DISABLED}
            display_name: Tienda Pausada
            master_database: {MASTER_DATABASES[DISABLED]}
            enabled: false
        """
    )


def start_stack(work: Path, log_dir: Path) -> Stack:
    """Start the whole stack and wait until it is ready; on failure stop it and raise."""
    suffix = uuid.uuid4().hex[:10]
    admin = sa.make_url(POSTGRES_ADMIN_URL)
    stack = Stack(
        work=work,
        log_dir=log_dir,
        env={},
        dagster_db=f"hermes_stack_{suffix}",
        masterdata_db=f"hermes_stack_{suffix}_md",
    )
    _create_databases(stack.dagster_db, stack.masterdata_db)
    try:
        _start(stack, admin)
    except BaseException:
        stack.stop()
        raise
    return stack


def _start(stack: Stack, admin: sa.URL) -> None:
    work, log_dir = stack.work, stack.log_dir
    home = work / "dagster_home"
    home.mkdir(parents=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    # The production instance, unchanged: only the environment points it at this database.
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")

    now = datetime.now(UTC).replace(second=0, microsecond=0)
    stack.first_day = now.astimezone(ZONE).date() - timedelta(days=PARTITION_DAYS)
    sim_start = datetime.combine(stack.first_day, datetime.min.time(), tzinfo=ZONE)
    stack.simulator_config = SimulatorConfig(
        clients=2000, seed=20261127, start=sim_start, end=now, dirty_share=0.05,
        tokens={TOKEN: ("clients:read",)}, site_name="Tienda Stack",
    )  # fmt: skip
    sim_port, grpc_port, web_port = free_port(), free_port(), free_port()
    stack.simulator_url = f"http://127.0.0.1:{sim_port}"
    stack.webserver_url = f"http://127.0.0.1:{web_port}"
    integrations_file = work / "integrations.yaml"
    integrations_file.write_text(
        integrations_yaml(stack.simulator_url, stack.first_day), encoding="utf-8"
    )

    masterdata_url = admin.set(drivername="postgresql+psycopg", database=stack.masterdata_db)
    stack.env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": admin.host or "127.0.0.1",
        "DAGSTER_PG_PORT": str(admin.port or 5432),
        "DAGSTER_PG_DB": stack.dagster_db,
        "DAGSTER_PG_USER": admin.username or "postgres",
        "DAGSTER_PG_PASSWORD": admin.password or "",
        "HERMES_CODE_SERVER_HOST": "127.0.0.1",
        "HERMES_CODE_SERVER_PORT": str(grpc_port),
        "HERMES_INTEGRATIONS_FILE": str(integrations_file),
        "HERMES_MASTERDATA_URL": masterdata_url.render_as_string(hide_password=False),
        "HERMES_STATE_DIR": str(work / "state"),
        TOKEN_ENV: TOKEN,
    }
    config = stack.simulator_config
    assert config.start is not None and config.end is not None
    start = ManagedProcess.start
    stack.processes["simulator"] = start(
        "simulator",
        [BIN / "hermes-orchestration", "simulate", "--port", sim_port, "--clients", config.clients,
         "--seed", config.seed, "--dirty-share", config.dirty_share, "--token", TOKEN,
         "--start", config.start.isoformat(), "--end", config.end.isoformat(),
         "--site-name", config.site_name],
        env=stack.env, log_dir=log_dir,
    )  # fmt: skip
    # Dagster's schema, created as a deployment (or an upgrade) does, before any process uses it.
    migrate = subprocess.run(
        [BIN / "dagster", "instance", "migrate"],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_TIMEOUT,
    )  # fmt: skip
    (log_dir / "instance_migrate.log").write_text(migrate.stdout + migrate.stderr)
    if migrate.returncode != 0:
        raise StackError(stack.explain(f"dagster instance migrate failed:\n{migrate.stderr}"))

    stack.processes["code_server"] = start(
        "code_server",
        [BIN / "dagster", "api", "grpc", "-m", "hermes_orchestration.definitions",
         "-h", "127.0.0.1", "-p", grpc_port, "--location-name", LOCATION,
         "--use-python-environment-entry-point"],
        env=stack.env, log_dir=log_dir,
    )  # fmt: skip
    stack.wait_for("the simulator to answer", lambda: _http_answers(stack.simulator_url), 30, 0.2)
    stack.wait_for(
        "the code server to pass its health check",
        lambda: _grpc_healthy(grpc_port, stack.env),
        STARTUP_TIMEOUT,
    )
    workspace = ROOT / "deploy" / "workspace.yaml"
    stack.processes["webserver"] = start(
        "webserver",
        [BIN / "dagster-webserver", "-h", "127.0.0.1", "-p", web_port, "-w", workspace],
        env=stack.env, log_dir=log_dir,
    )  # fmt: skip
    stack.processes["daemon"] = start(
        "daemon", [BIN / "dagster-daemon", "run", "-w", workspace], env=stack.env, log_dir=log_dir
    )
    stack.wait_for(
        "the webserver's /server_info",
        lambda: _http_ok(f"{stack.webserver_url}/server_info"),
        STARTUP_TIMEOUT,
        0.5,
    )
    stack.wait_for("the code location to load", lambda: _location_loaded(stack), 60)
    stack.wait_for("the daemons' heartbeats", lambda: _daemons_healthy(stack), 90)


def _http_answers(url: str) -> bool | None:
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        return None
    return True


def _http_ok(url: str) -> bool | None:
    try:
        return True if httpx.get(url, timeout=2).status_code == 200 else None
    except httpx.TransportError:
        return None


def _grpc_healthy(port: int, env: dict[str, str]) -> bool | None:
    # The server binds its port once the code is loaded: poll cheaply before asking Dagster.
    with socket.socket() as sock:
        sock.settimeout(0.5)
        if sock.connect_ex(("127.0.0.1", port)) != 0:
            return None
    check = subprocess.run(
        [BIN / "dagster", "api", "grpc-health-check", "-h", "127.0.0.1", "-p", str(port)],
        env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    return True if check.returncode == 0 else None


def _location_loaded(stack: Stack) -> bool | None:
    workspace = stack.graphql(LOCATION_QUERY)["workspaceOrError"]
    if workspace["__typename"] != "Workspace":
        raise StackError(f"workspace: {workspace}")
    for entry in workspace["locationEntries"]:
        if entry["name"] != LOCATION or entry["loadStatus"] != "LOADED":
            continue
        loaded = entry["locationOrLoadError"]
        if loaded and loaded["__typename"] == "PythonError":
            raise StackError(stack.explain(f"the code location failed to load: {loaded}"))
        return True
    return None


def _daemons_healthy(stack: Stack) -> bool | None:
    statuses = stack.graphql(DAEMONS_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
    healthy = {status["daemonType"] for status in statuses if status["healthy"]}
    return True if healthy >= REQUIRED_DAEMONS else None


# -- fixtures (test modules load this file with `pytest_plugins`, so one stack serves them all) --

_USERS_LEFT = pytest.StashKey[int]()
FIXTURE = "dagster_stack"


@pytest.fixture(scope="session")
def dagster_stack_session(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The one stack of the session; stopped at the end of the session whatever happens."""
    request.config.stash[_USERS_LEFT] = sum(
        FIXTURE in item.fixturenames for item in request.session.items
    )
    try:
        stack = start_stack(tmp_path_factory.mktemp("stack"), ARTIFACTS / "stack")
    except StackError as err:
        pytest.fail(f"the Dagster stack did not start:\n{err}", pytrace=False)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def dagster_stack(request: pytest.FixtureRequest, dagster_stack_session: Stack) -> Iterator[Stack]:
    """The running stack; it stops right after the last test that uses it, sparing the others
    its schedule's runs."""
    yield dagster_stack_session
    request.config.stash[_USERS_LEFT] -= 1
    if request.config.stash[_USERS_LEFT] <= 0:
        dagster_stack_session.stop()
