"""Where qlab keeps the user's data: the run database and, beside it, exported models."""

from __future__ import annotations

import os
from pathlib import Path

DB_ENV = "QLAB_DB"


def default_path() -> Path:
    """``$XDG_DATA_HOME/qlab/runs.sqlite``, or ``~/.local/share/qlab/runs.sqlite``."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "qlab" / "runs.sqlite"


def resolve_path(db: str | os.PathLike | None = None) -> Path:
    """The database to use: an explicit path, else ``QLAB_DB``, else the default under the data directory."""
    chosen = db or os.environ.get(DB_ENV) or default_path()
    return Path(chosen).expanduser()
