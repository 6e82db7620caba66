"""Shared fixtures: one bundled Hermes simulator and one PostgreSQL database per test session.

Everything here is real: the simulator is an HTTP server on 127.0.0.1, PostgreSQL is the local
server at 127.0.0.1:5432, and Dagster instances are real (temporary) instances.
"""

from __future__ import annotations

import os
import textwrap
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from hermes_orchestration.simulator import HermesSimulator, SimulatorConfig

# Distinctive values, so that a scan for the token anywhere cannot miss it by accident.
TOKEN = "hrm_live_7Q2xk9TzS3cR8vLw1NpA"
SCOPELESS_TOKEN = "hrm_live_noscope_4F6hJ2kL0mB9"
TOKEN_ENV = "HERMES_TOKEN_TEST_SITE"

SIM_START = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)  # 2026-11-02 00:00 in America/Santiago
SIM_END = datetime(2026, 11, 6, 3, 0, tzinfo=UTC)  # four daily partitions: 2026-11-02 .. 05
SIM_PARTITIONS = ["2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05"]

POSTGRES_ADMIN_URL = os.environ.get(
    "HERMES_TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def simulator() -> Iterator[HermesSimulator]:
    """A Hermes site with dirty data over four days, shared by the whole session (read-only)."""
    config = SimulatorConfig(
        clients=3000,
        seed=20261127,
        start=SIM_START,
        end=SIM_END,
        dirty_share=0.15,
        tokens={TOKEN: ("clients:read",), SCOPELESS_TOKEN: ()},
        site_name="Tienda de Pruebas",
    )
    with HermesSimulator(config) as sim:
        sim.start()
        yield sim


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this session's own, dropped at the end."""
    name = f"hermes_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as err:  # pragma: no cover - the machine promises PostgreSQL
        pytest.fail(f"the local PostgreSQL at 127.0.0.1:5432 is not reachable: {err}")
    url = sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's private local state folder (staged files, default SQLite master database),
    and the embedded master database by default: no test writes into the project's own `.state`
    or into a master database named by the environment it runs in."""
    path = tmp_path / "state"
    monkeypatch.setenv("HERMES_STATE_DIR", str(path))
    monkeypatch.delenv("HERMES_MASTERDATA_URL", raising=False)
    return path


IntegrationsWriter = Callable[..., Path]


@pytest.fixture
def integrations_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, simulator: HermesSimulator
) -> IntegrationsWriter:
    """Write an integrations.yaml pointing at the session simulator and make it the active one."""

    def write(
        *names: str,
        master_database: str = "clientes_test",
        max_reject_ratio: float = 0.5,
        extra: str = "",
    ) -> Path:
        entries = "".join(
            textwrap.dedent(
                f"""\
                  - name: {name}
                    display_name: Integración {name}
                    site_url: {simulator.url}
                    app_token_env: {TOKEN_ENV}
                    master_database: {master_database}
                    partitions: {{granularity: daily, start: 2026-11-01}}
                    page_size: 250
                    max_requests_per_second: 200
                    max_reject_ratio: {max_reject_ratio}
                """
            )
            + textwrap.indent(textwrap.dedent(extra), "    ")
            for name in names or ("tienda_test",)
        )
        path = tmp_path / "integrations.yaml"
        path.write_text(
            "defaults:\n  timezone: America/Santiago\nintegrations:\n" + entries, encoding="utf-8"
        )
        monkeypatch.setenv("HERMES_INTEGRATIONS_FILE", str(path))
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        return path

    return write
