"""Secrets stay secret: the App Token and the database password appear in no record of a run.

Syncs that succeed and syncs that fail in every way a run can fail (a refused token, server
errors, timeouts, a database that is not there, a URL that does not parse) leave behind a
Dagster instance (runs, event log, materialization metadata, captured compute logs), log lines,
exception texts and command-line output. All of it is scanned for the token, a refused token and
the master database password. The same file checks that a token missing from the environment is
named before any request is sent, and that TLS verification cannot be turned off.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from hermes_orchestration.config import IntegrationsFileError, parse_integrations
from hermes_orchestration.resources import HermesApiResource
from hermes_orchestration.simulator import HermesSimulator, SimulatorConfig
from hermes_orchestration.tags import FAILURE_TAG
from hermes_orchestration_tests.conftest import TOKEN, TOKEN_ENV
from hermes_orchestration_tests.faults_support import (
    FaultProxy,
    Forward,
    Hang,
    Respond,
    definitions,
    fast_api,
    fresh_postgres,
    memory_instance,
    run_errors,
    step_failures,
    sync,
    write_integrations,
)

PASSWORD = "Sup3rSecretPw"  # the local server trusts its clients, so any password connects
REFUSED_TOKEN = "hrm_live_revoked_Zq81mXv2Lp"
SECRETS = (TOKEN, REFUSED_TOKEN, PASSWORD)
DAY = "2026-11-02"
NAME = "tienda_secreta"
URL_ENV = "HERMES_TEST_SECRET_MASTERDATA_URL"


@pytest.fixture(scope="module")
def site() -> Iterator[HermesSimulator]:
    config = SimulatorConfig(
        clients=150,
        seed=5150,
        start=datetime(2026, 11, 2, 3, 0, tzinfo=UTC),
        end=datetime(2026, 11, 3, 3, 0, tzinfo=UTC),
        dirty_share=0.1,
        tokens={TOKEN: ("clients:read",)},
    )
    with HermesSimulator(config) as simulator:
        yield simulator


@pytest.fixture
def secret_url() -> Iterator[str]:
    """A PostgreSQL master database whose URL carries a password."""
    with fresh_postgres(password=PASSWORD) as url:
        assert PASSWORD in url
        yield url


def leaks(text: str) -> list[str]:
    """The secrets that ``text`` contains, if any."""
    return [secret for secret in SECRETS if secret in text]


def files_holding(root: Path, needles: tuple[str, ...] = SECRETS) -> dict[str, list[str]]:
    """Every file under ``root`` (databases included, read as bytes) holding one of ``needles``."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [needle for needle in needles if needle.encode() in data]
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


def run_records(instance: dg.DagsterInstance, run_id: str) -> str:
    """The whole event log of a run, errors and metadata included, as text."""
    parts = []
    for entry in instance.all_logs(run_id):
        parts.append(dg.serialize_value(entry))
        event = entry.dagster_event
        error = getattr(event.event_specific_data, "error", None) if event else None
        if error is not None:
            parts.append(error.to_string())
    run = instance.get_run_by_id(run_id)
    parts.append(dg.serialize_value(run))
    return "\n".join(parts)


def test_no_secret_in_any_record_of_successful_and_failed_runs(
    site: HermesSimulator,
    secret_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv(URL_ENV, secret_url)
    staging = tmp_path / "staging"
    texts: list[str] = []
    outcomes: dict[str, dg.ExecuteInProcessResult] = {}

    with (
        FaultProxy(site.url) as proxy,
        caplog.at_level(logging.DEBUG),
        dg.instance_for_test(temp_dir=str(home)) as instance,
    ):
        config = write_integrations(
            tmp_path / "integrations.yaml", site_url=proxy.url, names=[NAME]
        )
        integration = config.integrations[0]

        def run(label: str, token: str = TOKEN, rule: Any = None, **api: Any) -> None:
            monkeypatch.setenv(TOKEN_ENV, token)
            proxy.rule = rule or (lambda number, target: Forward())
            defs = definitions(
                config, staging=staging, masterdata_url_env=URL_ENV, hermes_api=fast_api(**api)
            )
            outcomes[label] = sync(defs, integration, instance, DAY)

        run("success")
        run("refused token", token=REFUSED_TOKEN)
        run("server errors", rule=lambda number, target: Respond(503), max_attempts=2)
        run(
            "timeouts",
            rule=lambda number, target: Hang(seconds=1.0),
            timeout_seconds=0.3,
            max_total_seconds=1.0,
        )
        # The master database fails after fetching and validating: a traceback through the load.
        missing = secret_url.rsplit("/", 1)[0] + "/hermes_no_such_database"
        monkeypatch.setenv(URL_ENV, missing)
        run("missing database")
        monkeypatch.setenv(URL_ENV, missing.replace(":5432", ":not_a_port"))
        run("unparsable url")

        for result in outcomes.values():
            texts.append(run_records(instance, result.run_id))
        texts.append(
            dg.serialize_value(
                instance.fetch_materializations(
                    dg.AssetKey(["hermes", NAME, "master_data"]), limit=10
                ).records
            )
        )

    assert {label for label, result in outcomes.items() if result.success} == {"success"}
    failures = {label: run_errors(result) for label, result in outcomes.items()}
    assert "The site rejected the App Token" in failures["refused token"]
    assert "failed after 2 attempts; last cause: HTTP 503" in failures["server errors"]
    assert "last cause: timed out" in failures["timeouts"]
    masked = "postgresql+psycopg://postgres:***@127.0.0.1:5432/hermes_no_such_database"
    assert masked in failures["missing database"]
    assert "not a valid SQLAlchemy URL" in failures["unparsable url"]

    assert {label: leaks(text) for label, text in failures.items()} == {
        label: [] for label in outcomes
    }
    captured = capfd.readouterr()
    assert "The site rejected the App Token" in captured.err  # the console log was captured
    assert leaks("\n".join([*texts, caplog.text, captured.out, captured.err])) == []
    # Everything the instance wrote to disk: runs, event logs, compute logs.
    assert list(home.rglob("compute_logs/**/*.err")), "compute logs should have been captured"
    # The scan reads what the runs wrote: the hint naming the token's variable is found in it.
    assert files_holding(home, (TOKEN_ENV,))
    assert files_holding(home) == {}


def test_no_secret_in_the_command_line_output_or_its_dagster_home(
    site: HermesSimulator, secret_url: str, tmp_path: Path
) -> None:
    config = write_integrations(tmp_path / "integrations.yaml", site_url=site.url, names=[NAME])
    command = str(Path(sys.executable).parent / "hermes-orchestration")

    def start(
        label: str, token: str, *args: str, url: str = secret_url
    ) -> tuple[Path, subprocess.Popen[str]]:
        home = tmp_path / label
        home.mkdir()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "HERMES_STATE_DIR": str(home / "state"),
            "HERMES_INTEGRATIONS_FILE": str(config.path),
            "HERMES_MASTERDATA_URL": url,
            TOKEN_ENV: token,
        }
        process = subprocess.Popen(
            [command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return home, process

    sync_args = ("sync", NAME, "--partition", DAY)
    unparsable = secret_url.replace(":5432", ":not_a_port")
    started = {
        "sync ok": start("ok", TOKEN, *sync_args),
        "sync refused": start("refused", REFUSED_TOKEN, *sync_args),
        "sync bad url": start("bad_url", TOKEN, *sync_args, url=unparsable),
        "verify refused": start("verify", REFUSED_TOKEN, "verify", NAME),
    }
    finished = {}
    for label, (home, process) in started.items():
        out, err = process.communicate(timeout=300)
        finished[label] = (process.returncode, out + err, home)

    code, output, _ = finished["sync ok"]
    assert code == 0, output[-3000:]
    assert f"OK {NAME}: run " in output
    code, output, _ = finished["sync refused"]
    assert code == 1
    assert f"FAILED {NAME}: run " in output and "The site rejected the App Token" in output
    assert f"set it in the environment variable {TOKEN_ENV}" in output
    code, output, _ = finished["sync bad url"]
    assert code == 1
    assert f"FAILED {NAME}: run " in output
    assert "MasterDataError: the master database URL is not a valid SQLAlchemy URL" in output
    code, output, _ = finished["verify refused"]
    assert code == 1 and "rejected" in output
    for label, (_, output, home) in finished.items():
        assert leaks(output) == [], label
        assert files_holding(home) == {}, label
    for label in ("sync ok", "sync refused", "sync bad url"):
        assert files_holding(finished[label][2], (NAME,)), f"{label} recorded no run"


def test_a_token_missing_from_the_environment_is_named_before_any_request(
    site: HermesSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(URL_ENV, f"sqlite:///{tmp_path / 'masterdata.sqlite'}")
    with FaultProxy(site.url) as proxy, memory_instance() as instance:
        config = write_integrations(
            tmp_path / "integrations.yaml", site_url=proxy.url, names=[NAME]
        )
        defs = definitions(config, staging=tmp_path / "staging", masterdata_url_env=URL_ENV)
        result = sync(defs, config.integrations[0], instance, DAY)
        run = instance.get_run_by_id(result.run_id)

    assert not result.success
    message = step_failures(result)[f"hermes__{NAME}__raw_clients"]
    assert (
        f"The environment variable {TOKEN_ENV} that should hold the Hermes App Token is not set."
    ) in message
    assert f"What to do: Set {TOKEN_ENV} to an App Token issued in Hermes" in message
    assert run.tags[FAILURE_TAG] == "missing_token"
    assert proxy.seen == []  # not one request left


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def self_signed_site(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate; the requests it received."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            received.append(self.path)
            self.send_response(500)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_a_certificate_that_does_not_verify_fails_the_run_before_the_token_is_sent(
    self_signed_site: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_url, received = self_signed_site
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setenv(URL_ENV, f"sqlite:///{tmp_path / 'masterdata.sqlite'}")
    config = write_integrations(tmp_path / "integrations.yaml", site_url=site_url, names=[NAME])
    defs = definitions(config, staging=tmp_path / "staging", masterdata_url_env=URL_ENV)
    with memory_instance() as instance:
        result = sync(defs, config.integrations[0], instance, DAY)
        run = instance.get_run_by_id(result.run_id)

    assert not result.success
    message = step_failures(result)[f"hermes__{NAME}__raw_clients"]
    assert f"the TLS handshake with {site_url} failed" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert "TLS verification is always on and cannot be turned off" in message
    assert run.tags[FAILURE_TAG] == "tls"
    assert received == []  # no request, so no Authorization header, ever reached the server


def test_there_is_no_way_to_turn_tls_verification_off_or_use_plain_http_off_loopback() -> None:
    switches = ("verify", "tls", "ssl", "insecure", "cert")
    assert not [f for f in HermesApiResource.model_fields if any(s in f for s in switches)]

    def problems(extra: str, site_url: str = "https://tienda.example.cl") -> str:
        text = (
            "integrations:\n  - name: tienda\n    site_url: " + site_url + "\n"
            "    app_token_env: HERMES_TOKEN_TIENDA\n    master_database: clientes\n"
            "    partitions: {granularity: daily, start: 2026-11-01}\n" + extra
        )
        with pytest.raises(IntegrationsFileError) as caught:
            parse_integrations(text, "integrations.yaml")
        return str(caught.value)

    assert "verify_tls" in problems("    verify_tls: false\n")
    assert "plain http is allowed only for localhost/127.0.0.1/[::1]; use https" in problems(
        "", site_url="http://tienda.example.cl"
    )
