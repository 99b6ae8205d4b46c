"""Run history in SQLite: every finished result is saved as it completes, so a killed run keeps what it did.

- ``db``: the database file, its migrations, and connections that write or only read (WAL, read-only files,
  in-memory snapshots).
- ``meta``: what a run records (``RunMeta``) and the helpers that build it per kind of run.
- ``runs``: the ``Store`` that writes and reads runs and their results, their statuses.
- ``transfer``: the export payload and the JSON shapes an import accepts; a scheme's per-layer JSON.
- ``recorder``: the ``Recorder`` that commits results as they arrive.
- ``report``: the HTML report and the tables and charts shared with the History page (import it by name).
"""

from qlab.store.db import MIGRATIONS, SCHEMA_VERSION
from qlab.store.meta import RunMeta, bench_meta, environment, run_meta, sensitivity_meta, sweep_meta
from qlab.store.recorder import Recorder, save_sensitivity, save_summary, sensitivity_saver, store_rows
from qlab.store.runs import (
    ANALYSIS_RUN,
    STATUSES,
    SUMMARY_KIND,
    Store,
    StoredResult,
    StoredRun,
    read_database,
    requested_path,
    stored_sensitivity,
)
from qlab.store.transfer import EXPORT_FORMAT, scheme_export

__all__ = [
    "ANALYSIS_RUN", "EXPORT_FORMAT", "MIGRATIONS", "SCHEMA_VERSION", "STATUSES", "SUMMARY_KIND", "Recorder",
    "RunMeta", "Store", "StoredResult", "StoredRun", "bench_meta", "environment", "read_database",
    "requested_path", "run_meta", "save_sensitivity", "save_summary", "scheme_export", "sensitivity_meta",
    "sensitivity_saver", "store_rows", "stored_sensitivity", "sweep_meta",
]
