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


SYNC_PROBE = """
import json, sys
from hermes_orchestration.records import records_to_batch
from hermes_orchestration.validation import validate_partition
import hermes_orchestration.masterdata, hermes_orchestration.sync
client = {"id": "1", "email": "ana@example.cl", "updated_at": "2026-11-02T10:00:00Z"}
batch = records_to_batch([client])
validate_partition(batch)
loaded = "pandas" in sys.modules
frame = batch.to_pandas()  # whoever wants pandas still gets it
print(json.dumps([loaded, type(frame).__name__]))
"""


def test_the_data_path_converts_and_validates_without_importing_pandas() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", SYNC_PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == [False, "DataFrame"]


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
