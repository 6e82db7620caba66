"""The code location: every integration of integrations.yaml as a partitioned asset chain.

`dagster dev`, `dagster definitions validate -m hermes_orchestration.definitions` and
`dagster asset materialize -m hermes_orchestration.definitions ...` all load ``defs`` from here.
Loading reads integrations.yaml (``HERMES_INTEGRATIONS_FILE`` moves it) and builds definitions
(see ``code_location``); it opens no connection and reads no secret.
"""

from __future__ import annotations

from hermes_orchestration.code_location import build_definitions
from hermes_orchestration.config import load_integrations

__all__ = ["build_definitions", "defs"]

defs = build_definitions(load_integrations())
