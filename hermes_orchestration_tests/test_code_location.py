"""Loading the code location: what the processes that only read the definitions pay for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DATA_PATH = ["pyarrow", "pandas", "psycopg", "httpx", "email_validator"]

PROBE = f"""
import json, sys
import hermes_orchestration.definitions
import hermes_orchestration.cli
print(json.dumps([name for name in {DATA_PATH!r} if name in sys.modules]))
"""


def test_the_definitions_load_without_arrow_the_database_drivers_or_the_http_client(
    integrations_file,
) -> None:
    # The code server, the daemon, sensors and `status` load them again and again; a run
    # imports what its steps use when they start.
    integrations_file("tienda_norte", "tienda_sur")
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == []


CONSOLE_SCRIPT = Path(sys.executable).parent / "hermes-orchestration"


def test_the_console_script_says_everything_and_keeps_its_exit_status(
    tmp_path, monkeypatch
) -> None:
    # The command exits without tearing the interpreter down: what it printed must all be out,
    # including what its buffered output still held.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    schema = subprocess.run(
        [CONSOLE_SCRIPT, "schema"], capture_output=True, text=True, timeout=120, check=False
    )
    assert schema.returncode == 0, schema.stderr
    assert json.loads(schema.stdout)["title"]
    assert schema.stdout.endswith("}\n")  # the last piece, still buffered when the command ended
    broken = tmp_path / "integrations.yaml"
    broken.write_text("integrations:\n  - name: Tienda Mala\n", encoding="utf-8")
    check = subprocess.run(
        [CONSOLE_SCRIPT, "validate", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 1
    assert "Tienda Mala" in check.stdout + check.stderr
