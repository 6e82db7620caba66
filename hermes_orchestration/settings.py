"""Where the project keeps its local state, and the environment variables that move it.

Read at run time only (never at import): the embedded default needs no server, and production
points the same code elsewhere with environment variables.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

STATE_DIR_ENV = "HERMES_STATE_DIR"
MASTERDATA_URL_ENV = "HERMES_MASTERDATA_URL"


def state_dir() -> Path:
    """The local state folder: staged Parquet files and the embedded master database.

    ``HERMES_STATE_DIR`` moves it; the default is ``.state`` at the project root.
    """
    configured = os.environ.get(STATE_DIR_ENV)
    path = Path(configured) if configured else PROJECT_ROOT / ".state"
    return path.resolve()


def staging_dir() -> Path:
    """Where the assets keep their per-partition Parquet files."""
    return state_dir() / "staging"


def masterdata_url(env: str = MASTERDATA_URL_ENV) -> str:
    """The SQLAlchemy URL of the master database: the env var ``env``, else a local SQLite file."""
    configured = os.environ.get(env, "").strip()
    if configured:
        return configured
    path = state_dir() / "masterdata.sqlite"
    return f"sqlite:///{path}"
