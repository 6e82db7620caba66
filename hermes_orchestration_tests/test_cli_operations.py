"""``hermes-orchestration pause``, ``resume`` and ``status`` on the instance DAGSTER_HOME names.

The history is made with the command line itself (``sync``), on SQLite storage and on a
PostgreSQL-backed Dagster instance with a database of its own.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from hermes_orchestration.cli import main
from hermes_orchestration_tests.conftest import POSTGRES_ADMIN_URL, SIM_PARTITIONS, TOKEN
from hermes_orchestration_tests.operations_support import (
    WRONG_TOKEN,
    set_token,
    write_integrations,
)

ENTRIES = {
    "tienda_ok": "",
    "tienda_rota": "",
    "tienda_nueva": "",
    "tienda_apagada": "enabled: false",
}


@pytest.fixture
def dagster_postgres() -> Iterator[str]:
    """A PostgreSQL database of its own for a Dagster instance's storage, dropped afterwards."""
    name = f"hermes_dagster_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg2", database=name)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str | None) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    if postgres_url is not None:
        (home / "dagster.yaml").write_text(
            f"storage:\n  postgres:\n    postgres_url: {postgres_url}\n", encoding="utf-8"
        )
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "storage", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_status_shows_every_card_from_the_history_the_cli_made(
    storage: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    simulator,
    state_dir,
) -> None:
    postgres = request.getfixturevalue("dagster_postgres") if storage == "postgresql" else None
    dagster_home(tmp_path, monkeypatch, postgres)
    write_integrations(
        tmp_path, monkeypatch, simulator, ENTRIES, tokens={"tienda_rota": WRONG_TOKEN}
    )

    code, out, _ = run_cli(capsys, "sync", "tienda_ok", "--partition", SIM_PARTITIONS[1])
    assert code == 0, out
    code, _, err = run_cli(capsys, "sync", "tienda_rota", "--partition", SIM_PARTITIONS[1])
    assert code == 1 and "HTTP 401" in err
    failed_run = re.search(r"FAILED tienda_rota: run ([0-9a-f-]{36}):", err).group(1)

    code, out, _ = run_cli(capsys, "status", "--json")
    assert code == 0
    document = json.loads(out)
    cards = {card["name"]: card for card in document["integrations"]}
    assert list(cards) == list(ENTRIES)  # file order
    assert {name: card["health"] for name, card in cards.items()} == {
        "tienda_ok": "ok",
        "tienda_rota": "error",
        "tienda_nueva": "never synced",
        "tienda_apagada": "paused",
    }
    ok = cards["tienda_ok"]
    assert ok["type"] == "hermes"
    assert ok["display_name"] == "Integración tienda_ok"
    assert ok["master_database"] == "clientes_test"
    assert ok["last_successful_sync"]["run_id"]
    assert ok["master_data_updated_at"].startswith(document["generated_at"][:10])
    assert ok["freshness"] == "fresh" and ok["stale"] is False
    assert ok["switch"]["state"] == "on"
    rota = cards["tienda_rota"]
    assert rota["last_error"]["run_id"] == failed_run
    assert "HTTP 401" in rota["last_error"]["summary"]
    assert rota["last_successful_sync"] is None
    apagada = cards["tienda_apagada"]
    assert apagada["switch"]["paused_by"] == "yaml"
    assert "enabled: false" in apagada["paused_reason"]
    assert WRONG_TOKEN not in out and TOKEN not in out

    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    header, *rows = out.splitlines()
    for column in (
        "INTEGRATION",
        "DISPLAY NAME",
        "TYPE",
        "HEALTH",
        "LAST SUCCESSFUL SYNC",
        "MASTER DATABASE",
        "MASTER DATA UPDATED",
        "SWITCH",
    ):
        assert column in header
    table = {row.split()[0]: row for row in rows[:4]}
    assert table["tienda_ok"].split("  ")[0] == "tienda_ok"
    assert " ok " in table["tienda_ok"] and "ago)" in table["tienda_ok"]
    assert " error " in table["tienda_rota"]
    assert " never synced " in table["tienda_nueva"]
    assert table["tienda_apagada"].endswith("paused by integrations.yaml")
    assert f"tienda_rota: last error in run {failed_run}, " in out
    assert "tienda_apagada: paused by integrations.yaml: enabled: false; set enabled: true" in out


def test_pause_and_resume_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], simulator
) -> None:
    dagster_home(tmp_path, monkeypatch, None)
    write_integrations(
        tmp_path, monkeypatch, simulator, ENTRIES, tokens={"tienda_rota": WRONG_TOKEN}
    )

    code, out, _ = run_cli(capsys, "pause", "tienda_rota", "--reason", "token leaked")
    assert code == 0
    assert out.startswith("PAUSED tienda_rota (by hand): token leaked.")

    code, out, _ = run_cli(capsys, "status")
    assert "tienda_rota: paused by hand since " in out and ": token leaked" in out

    code, _, err = run_cli(capsys, "resume", "tienda_rota")
    assert code == 1
    assert err.startswith(
        "NOT RESUMED tienda_rota (was paused by hand: token leaked): verify failed."
    )
    assert "hermes-orchestration resume tienda_rota --force" in err

    set_token(monkeypatch, "tienda_rota", TOKEN)
    code, out, _ = run_cli(capsys, "resume", "tienda_rota")
    assert code == 0 and out.startswith("RESUMED tienda_rota after verify passed")
    code, out, _ = run_cli(capsys, "status", "--json")
    (rota,) = [card for card in json.loads(out)["integrations"] if card["name"] == "tienda_rota"]
    assert rota["switch"]["state"] == "on" and rota["health"] == "never synced"

    code, _, err = run_cli(capsys, "resume", "tienda_apagada", "--force")
    assert code == 1 and "enabled: false" in err


def test_operations_say_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], simulator
) -> None:
    write_integrations(tmp_path, monkeypatch, simulator, ENTRIES)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    code, _, err = run_cli(capsys, "status")
    assert code == 1 and err.startswith("DAGSTER_HOME is not set: point it at the folder")

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "nowhere"))
    code, _, err = run_cli(capsys, "pause", "tienda_ok")
    assert code == 1 and "is not a directory or does not exist" in err

    dagster_home(tmp_path, monkeypatch, None)
    code, _, err = run_cli(capsys, "pause", "tienda_inexistente")
    assert code == 1
    assert "no integration named 'tienda_inexistente'" in err and "tienda_ok" in err
