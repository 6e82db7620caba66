"""Loading the code location: what the processes that only read the definitions pay for."""

from __future__ import annotations

import json
import subprocess
import sys

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
