"""Recording as results arrive: each finished result is committed at once, so a killed run keeps what it did.

A sensitivity run stores its per-linear records (kind ``sensitivity_linear``, all at once, when the probe pass
ends) and then each end-to-end unit as it is measured (``sensitivity_block``); a recommendation run adds each
measured plan (``mix``) and the recommendation itself; a speed run stores one ``bench`` row per backend.
Everything needed to redraw them is in the run's settings, so ``qlab.store.runs.stored_sensitivity`` rebuilds
the report without recomputing, even for a run killed half-way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from qlab.core.errors import Cancelled, QlabError
from qlab.store.db import DatabaseBusy
from qlab.store.meta import RunMeta
from qlab.store.runs import SUMMARY_KIND, RunGone, Store


class Recorder:
    """``with Recorder(db, meta) as rec: rec.save(result)``: one run whose results are committed one by one.

    The run ends ``finished``; ``cancelled`` on qlab's Cancelled; ``stopped`` when the caller stops early
    (KeyboardInterrupt, a Streamlit rerun or stop); ``failed`` on an error, with its message. A process killed
    outright leaves ``running``, which listings show as ``interrupted`` once the process is gone.
    With ``strict=False`` (the dashboard) a database that cannot be written does not stop the work: saving
    is skipped and the reason is kept in ``error``. A database locked by another process past the busy timeout
    stops neither: the writes wait in ``pending`` and go in with the next result or at the end (strict: a
    ``DatabaseBusy`` then, once the work is done, if the lock outlasted it); a run deleted from elsewhere while
    it runs ends saving, not the work.
    """

    def __init__(self, db: str | os.PathLike | Store | None, meta: RunMeta, strict: bool = True) -> None:
        self.store = db if isinstance(db, Store) else Store(db)
        self.meta = meta
        self.strict = strict
        self.run_id: str | None = None
        self.saved = 0
        self.error: str | None = None
        # Writes waiting for a lock another process holds past the busy timeout, in order, with how many
        # results each saves: the work goes on and they are tried again with each result and at the end.
        self.pending: list[tuple[Callable[[], object], int]] = []
        self.busy: DatabaseBusy | None = None

    def _guard(self, action: Callable[[], object], results: int = 0) -> None:
        if self.error is None:
            self.pending.append((action, results))
            self._flush()

    def _flush(self) -> None:
        while self.pending and self.error is None:
            action, results = self.pending[0]
            try:
                action()
            except DatabaseBusy as busy:
                self.busy = busy
                return
            except RunGone as error:  # deleted from elsewhere while it ran: the work goes on, unsaved
                self._stop(error)
                return
            except QlabError as error:
                if self.strict:
                    raise
                self._stop(error)
                return
            self.pending.pop(0)
            self.saved += results

    def _stop(self, error: QlabError) -> None:
        self.error = f"results are not being saved: {error}"
        self.pending.clear()

    def __enter__(self) -> Recorder:
        def start() -> None:
            self.run_id = self.store.start_run(self.meta)

        self._guard(start)
        return self

    def save(self, result: Any, kind: str | None = None, scheme: Any = None) -> None:
        self._guard(lambda: self.store.add_result(self.run_id, result, kind, scheme), 1)

    def save_many(self, results: Sequence[Any], kind: str | None = None) -> None:
        """Results that finished together (a sensitivity analysis's per-linear records), in one transaction."""
        if results:
            self._guard(lambda: self.store.add_results(self.run_id, results, kind), len(results))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status, error = "finished", None
        elif issubclass(exc_type, Cancelled):
            status, error = "cancelled", str(exc)
        elif issubclass(exc_type, Exception):
            status, error = "failed", f"{exc_type.__name__}: {exc}"[:500]
        else:  # KeyboardInterrupt, GeneratorExit, Streamlit's stop/rerun (BaseException subclasses)
            status, error = "stopped", None
        self._guard(lambda: self.store.finish_run(self.run_id, status, error))
        self._flush()  # one more busy timeout's wait for a lock still held
        if self.pending and self.busy is not None:
            unsaved = sum(results for _, results in self.pending)
            busy = DatabaseBusy(f"{unsaved} finished result(s) could not be stored: {self.busy}")
            self._stop(busy)
            if self.strict and exc_type is None:  # (an exception already on its way is not replaced)
                raise busy


def store_rows(db: str | os.PathLike | Store | None, meta: RunMeta, rows: Iterable[Any]) -> Iterator[Any]:
    """Pass ``rows`` through unchanged, committing each to a new run before yielding it (queued while another
    process holds the database locked, so the caller still gets, and can write out, every row).

    ``for row in store_rows(db, sweep_meta(loaded, schemes, spec), run_sweep(...))``: a killed sweep keeps
    every scheme that finished.
    """
    with Recorder(db, meta) as recorder:
        for row in rows:
            recorder.save(row)
            yield row


def save_summary(recorder: Recorder, **values: Any) -> None:
    """The run's closing record (phase timings...), saved last."""
    recorder.save({"label": SUMMARY_KIND, **values}, SUMMARY_KIND)


def sensitivity_saver(recorder: Recorder) -> Callable[[str, list[dict]], None]:
    """An ``on_records`` callback for ``qlab.analyses.sensitivity.analyze`` that commits records as they finish."""
    def save(part: str, records: list[dict]) -> None:
        recorder.save_many(records, f"sensitivity_{part}")

    return save


def save_sensitivity(recorder: Recorder, report) -> None:
    """Copy a finished SensitivityReport into a run: a recommendation built on an analysis already shown whose
    own run cannot be named (it was not stored, or is gone); otherwise settings ``analysis_run`` names it."""
    recorder.save_many(report.linears, "sensitivity_linear")
    recorder.save_many(report.blocks, "sensitivity_block")
