"""Times the stages of loading the code location, in a fresh process; prints one JSON object.

Stages: imports (Dagster and the package's modules), ``hermes_orchestration.definitions`` (reads
the integrations file named by HERMES_INTEGRATIONS_FILE and builds the definitions), reading the
YAML again alone, resolving the repository (what every code-location load does first), and the
snapshot the code server serves (built and serialized). Run by ``scale_integrations.py``.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time


def main() -> int:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    import dagster as dg  # noqa: F401
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster_shared.serdes import serialize_value

    for module in ("assets", "config", "jobs", "resources", "schedules", "partitions"):
        importlib.import_module(f"hermes_orchestration.{module}")
    timings["imports"] = time.perf_counter() - started

    mark = time.perf_counter()
    definitions = importlib.import_module("hermes_orchestration.definitions")
    timings["load_yaml_and_build"] = time.perf_counter() - mark

    from hermes_orchestration.config import load_integrations

    mark = time.perf_counter()
    integrations = len(load_integrations().integrations)
    timings["load_yaml_alone"] = time.perf_counter() - mark

    mark = time.perf_counter()
    repository = definitions.defs.get_repository_def()
    repository.load_all_definitions()
    timings["resolve_repository"] = time.perf_counter() - mark

    mark = time.perf_counter()
    snapshot = serialize_value(RepositorySnap.from_def(repository))
    timings["snapshot"] = time.perf_counter() - mark

    json.dump(
        {
            "integrations": integrations,
            "seconds": {name: round(value, 3) for name, value in timings.items()},
            "total_seconds": round(time.perf_counter() - started, 3),
            "jobs": len(list(repository.get_all_jobs())),
            "snapshot_bytes": len(snapshot),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
