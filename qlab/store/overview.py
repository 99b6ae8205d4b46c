"""The Overview, recorded: what the run store already holds for these settings, the missing pieces computed
cheapest first and each saved as it finishes, the four panels' figures, and the whole answer as one HTML file.

Each measured piece is its own run (``RUN_KINDS``), with one result per scheme (the scheme stored beside it), so
a page reload, another session or the CLI finds what is done and computes only the rest; a sweep of the Quantize
page counts as well. The memory plans and the roofline (``ARITHMETIC``) are computed on the spot instead: they
take milliseconds, and a stored copy could hide a corrected formula. The pieces themselves are
``qlab.analyses.overview`` and ``qlab.backends.format_speed``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import html
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
import plotly.graph_objects as go

from qlab import charts
from qlab.analyses import overview
from qlab.analyses.overview import TITLES, OverviewRequest, Pieces
from qlab.analyses.verdict import Verdict, accuracy_loss, details
from qlab.backends import format_speed, speed
from qlab.core.errors import Cancelled, QlabError
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import Baseline, CancelCheck, Progress, compute_baseline
from qlab.models.loading import LoadedModel, model_sha256
from qlab.store import Recorder, Store, StoredRun, run_meta

ARITHMETIC = ("memory", "predicted")
RUN_KINDS = {"sweep": "sweep", "sensitivity": "sensitivity_quick", "measured": "bench"}  # measured, stored
LOOKBACK_RUNS = 25  # newest runs of a kind searched for reusable results
TOP_LAYERS = 8
EXIT_WAIT_S = 30.0  # how long interpreter exit waits for a cancelled worker to reach its next check


# --- what is stored ----------------------------------------------------------------------------------------


def piece_settings(piece: str, loaded: LoadedModel, request: OverviewRequest) -> dict:
    """The inputs besides model, weights, schemes and text that a stored piece must share to be reused."""
    if piece == "sensitivity":
        return {"method": "quick"}
    if piece == "measured":
        return {"device": format_speed.device_of(loaded), "accuracy_tokens": None,
                **dataclasses.asdict(format_speed.QUICK_SPEC)}
    return {}


def _evaluated(piece: str) -> bool:
    return piece in ("sweep", "sensitivity")


def restore(store: Store, loaded: LoadedModel, request: OverviewRequest) -> Pieces:
    """Every measured piece the store holds for this model (same weights), schemes and settings; newest wins.
    Accuracy and this machine's speed do not depend on the target, so any target's runs count."""
    pieces = Pieces()
    sha = model_sha256(loaded)
    spec = request.spec
    swept = store.stored_schemes(loaded.name, sha, spec.text_sha256, spec.tokens)
    pieces.sweep = {s.label: swept[s] for s in request.schemes if s in swept}
    for piece in ("sensitivity", "measured"):
        wanted = {s: s.label for s in pieces.wanted(piece, request)}
        held = getattr(pieces, piece)
        for run in _matching_runs(store, piece, loaded, sha, request):
            for scheme, records in _by_scheme(piece, run).items():
                if scheme in wanted and wanted[scheme] not in held:
                    held[wanted[scheme]] = records if piece == "sensitivity" else records[0]
            if len(held) == len(wanted):
                break
    return pieces


def _matching_runs(store: Store, piece: str, loaded: LoadedModel, sha: str | None,
                   request: OverviewRequest) -> Iterator[StoredRun]:
    settings = piece_settings(piece, loaded, request)
    for summary in store.list_runs(model=loaded.name, kind=RUN_KINDS[piece], limit=LOOKBACK_RUNS):
        if summary["model"] != loaded.name:
            continue
        run = store.get(summary["id"])
        meta = run.meta
        if meta.model_sha256 != sha or any(meta.settings.get(k) != v for k, v in settings.items()):
            continue
        if _evaluated(piece) and (meta.text_sha256, meta.tokens) != (request.spec.text_sha256, request.spec.tokens):
            continue
        yield run


def _by_scheme(piece: str, run: StoredRun) -> dict[QuantScheme, list[dict]]:
    found: dict[QuantScheme, list[dict]] = {}
    for result in run.results:
        if result.kind != RUN_KINDS[piece]:
            continue
        if piece == "sensitivity":
            scheme = QuantScheme.from_dict(result.record["scheme_settings"])
        elif result.scheme:
            scheme = QuantScheme.from_dict(result.scheme)
        else:
            continue
        found.setdefault(scheme, []).append(result.record)
    return found


# --- computing what is missing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One missing piece: the schemes it still lacks and about how long they take."""

    piece: str
    schemes: tuple[QuantScheme, ...]
    seconds: float

    @property
    def title(self) -> str:
        return TITLES[self.piece]

    @property
    def announced(self) -> bool:
        """Long enough that its estimate is said before it starts."""
        return self.seconds > overview.ANNOUNCE_AFTER_S


def fill_arithmetic(loaded: LoadedModel, request: OverviewRequest, pieces: Pieces) -> None:
    """Memory plans and roofline predictions of the schemes that lack them, here and now (milliseconds; this
    machine's bandwidth is measured once per process, about a second). One that cannot be computed for this
    target is marked in ``pieces.skipped`` with the reason."""
    for piece in ARITHMETIC:
        missing = pieces.missing(piece, request)
        if not missing:
            continue
        try:
            if piece == "memory":
                pieces.memory.update(overview.memory_piece(loaded, request, missing))
            else:
                bandwidth = None if request.target.bandwidth_bytes_per_s else speed.this_machine_bandwidth()
                pieces.predicted.update(overview.predicted_piece(loaded, request, missing, bandwidth))
        except QlabError as error:
            pieces.skipped[piece] = str(error)


def steps(loaded: LoadedModel, request: OverviewRequest, pieces: Pieces, measure_here: bool = True,
          baseline_ready: bool = False) -> list[Step]:
    """The measured pieces still missing, cheapest first, each with its estimate (``measured`` only if
    ``measure_here``); a piece this version of qlab cannot compute is marked in ``pieces.skipped``."""
    if not overview.sensitivity_available():
        pieces.skipped["sensitivity"] = "the quick sensitivity analysis is not part of this version of qlab"
    found = []
    for piece in RUN_KINDS:
        missing = pieces.missing(piece, request)
        if not missing or (piece == "measured" and not measure_here):
            continue
        if piece == "measured":
            seconds = format_speed.estimate_seconds(loaded, missing)
        else:
            seconds = overview.estimate_seconds(piece, loaded, request, missing, baseline_ready)
        found.append(Step(piece, tuple(missing), seconds))
        baseline_ready = baseline_ready or _evaluated(piece)  # the next evaluating piece reuses its baseline
    return found


def run_step(step: Step, loaded: LoadedModel, request: OverviewRequest, pieces: Pieces, store: Store | None,
             baseline: Callable[[], Baseline], progress: Progress | None = None, cancel: CancelCheck | None = None,
             on_update: Callable[[], None] | None = None) -> str | None:
    """Compute one step, adding each scheme's result to ``pieces`` and saving it as it finishes (nothing is saved
    when ``store`` is None).

    ``baseline()`` gives the FP32 baseline of the request's text (computed once by the caller's cache).
    Returns why results could not be saved (a read-only database), or None; ``Cancelled`` propagates after
    the finished schemes are kept and saved.
    """
    piece, schemes = step.piece, list(step.schemes)
    by_label = {s.label: s for s in schemes}
    spec = request.spec if _evaluated(piece) else None
    meta = run_meta(RUN_KINDS[piece], loaded, spec, "this-machine", schemes=[s.to_dict() for s in schemes],
                    overview=True, **piece_settings(piece, loaded, request))
    recorder = Recorder(store, meta, strict=False) if store is not None else None

    def keep(held: dict, record: dict) -> None:
        held[record["label"]] = record
        if recorder is not None:
            recorder.save(record, RUN_KINDS[piece], by_label[record["label"]])
        if on_update:
            on_update()

    with recorder if recorder is not None else contextlib.nullcontext():
        if piece == "sweep":
            for record in overview.sweep_piece(loaded, request, schemes, baseline(), progress, cancel):
                keep(pieces.sweep, record)
        elif piece == "sensitivity":
            found = overview.sensitivity_piece(loaded, request, schemes, baseline(), progress, cancel)
            pieces.sensitivity.update(found)
            if recorder is not None:  # one pass scores every scheme: its records are saved together
                recorder.save_many([r for records in found.values() for r in records], RUN_KINDS[piece])
            if on_update:
                on_update()
        else:
            for record in format_speed.measure(loaded, schemes, progress=progress, cancel=cancel,
                                               cap_s=request.speed_cap_s):
                keep(pieces.measured, record)
    return recorder.error if recorder is not None else None


class OverviewJob:
    """The missing pieces of one Overview computed in order, each saved as it finishes: ``start()`` runs them on
    a worker thread (the dashboard polls ``state`` and ``progress``), ``run()`` in the caller's (the CLI).

    Any piece can be cancelled, waiting or running; the others go on. ``version`` grows with every new result
    and every change of state, ``results`` with new results only (what an answer drawn from the pieces shows).
    """

    def __init__(self, loaded: LoadedModel, request: OverviewRequest, pieces: Pieces, todo: Sequence[Step],
                 store: Store | None = None, listener: Callable[[Step, float, str], None] | None = None) -> None:
        """``listener(step, fraction, message)`` hears every progress report (the CLI's bar)."""
        self.loaded, self.request, self.pieces, self.todo, self.store = loaded, request, pieces, list(todo), store
        self.listener = listener
        self.state = {step.piece: "waiting" for step in self.todo}  # waiting, running, done, cancelled, failed
        self.progress: dict[str, tuple[float, str]] = {}
        self.notes: dict[str, str] = {}  # per piece: what a cancel kept, or why it failed
        self.save_error: str | None = None
        self.version = 0
        self.results = 0
        self.cancelled_by_user: set[str] = set()
        self._cancelled: set[str] = set()
        self._thread: threading.Thread | None = None
        self._baseline: Baseline | None = None
        self._running: str | None = None

    def start(self) -> OverviewJob:
        """Run the pieces on a worker thread, once the libraries they need are imported in this one.

        Libraries load lazily (transformers resolves ``AutoModel`` and friends on first use); a first use on the
        worker racing with a page loading a model on its own thread can leave one of them half imported.
        """
        import transformers

        for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):
            getattr(transformers, name)
        if any(step.piece == "sensitivity" for step in self.todo):
            overview.sensitivity_available()
        for step in self.todo:
            if step.piece == "measured":
                format_speed.import_libraries(self.loaded.kind, step.schemes, format_speed.device_of(self.loaded))
        self._thread = threading.Thread(target=self.run, name=f"overview {self.loaded.name}", daemon=True)
        _live_jobs.add(self)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def cancel(self, piece: str | None = None, by_user: bool = True) -> None:
        """Stop ``piece`` (every piece when None) at its next step; what it finished is kept."""
        chosen = [piece] if piece else list(self.state)
        self._cancelled.update(chosen)
        if by_user:
            self.cancelled_by_user.update(chosen)

    def baseline(self) -> Baseline:
        """The FP32 baseline of the request's text, computed once for the sweep and the sensitivity."""
        if self._baseline is None:
            self._baseline = compute_baseline(self.loaded, self.request.spec,
                                              cancel=lambda: self._running in self._cancelled)
        return self._baseline

    def run(self) -> None:
        for step in self.todo:
            piece = step.piece
            if piece in self._cancelled:
                self._finish(piece, "cancelled", "cancelled before it started; nothing computed")
                continue
            self.state[piece], self._running = "running", piece
            self.version += 1
            try:
                error = run_step(step, self.loaded, self.request, self.pieces, self.store, self.baseline,
                                 progress=lambda fraction, message, step=step: self._progress(step, fraction,
                                                                                             message),
                                 cancel=lambda piece=piece: piece in self._cancelled, on_update=self._changed)
                self.save_error = self.save_error or error
                self._finish(piece, "done", "")
            except Cancelled:
                kept = [s.label for s in step.schemes if s.label in getattr(self.pieces, piece)]
                self._finish(piece, "cancelled", f"cancelled; kept {', '.join(kept)} ({len(kept)} of "
                                                 f"{len(step.schemes)})" if kept else "cancelled; nothing finished")
            except QlabError as error:
                self._finish(piece, "failed", str(error))
            except Exception as error:  # a bug: keep its traceback in the log, say it on the page, go on
                logging.getLogger(__name__).exception("overview piece %s failed", piece)
                self._finish(piece, "failed", f"{type(error).__name__}: {error}")

    def _progress(self, step: Step, fraction: float, message: str) -> None:
        self.progress[step.piece] = (min(1.0, max(0.0, fraction)), message)
        if self.listener:
            self.listener(step, *self.progress[step.piece])

    def _changed(self) -> None:
        self.results += 1
        self.version += 1

    def _finish(self, piece: str, state: str, note: str) -> None:
        self.state[piece], self.notes[piece] = state, note
        self.version += 1


# --- the panels -------------------------------------------------------------------------------------------


def accuracy_frame(pieces: Pieces, request: OverviewRequest) -> pd.DataFrame:
    """Sweep rows of the chosen schemes with their loss and whether they are on the size/loss Pareto front."""
    rows = [pieces.sweep[s.label] for s in request.schemes if s.label in pieces.sweep]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).assign(loss=[accuracy_loss(r) for r in rows])
    frame["pareto"] = overview.pareto_front(list(zip(frame["size_bytes"], frame["loss"], strict=True)))
    return frame


def memory_frame(pieces: Pieces, request: OverviewRequest) -> pd.DataFrame:
    return pd.DataFrame([pieces.memory[s.label] for s in request.schemes if s.label in pieces.memory])


def speed_frame(pieces: Pieces, request: OverviewRequest) -> pd.DataFrame:
    """One row per (scheme, where): predicted on the target and measured here, the 16-bit reference included."""
    rows = []
    for scheme in [*request.schemes, *([overview.REFERENCE] if overview.REFERENCE not in request.schemes else [])]:
        reference = scheme == overview.REFERENCE
        predicted = pieces.predicted.get(scheme.label)
        if predicted:
            rows.append({"label": scheme.label, "where": "predicted", "speed": predicted["speed"],
                         "low": None, "high": None, "native": overview.native_on_target(predicted), "reference": reference,
                         "note": predicted.get("reason")})
        measured = pieces.measured.get(scheme.label)
        if measured and measured.get("speed"):
            rows.append({"label": scheme.label, "where": "measured", "speed": measured["speed"],
                         "low": measured.get("speed_min"), "high": measured.get("speed_max"), "native": None,
                         "reference": reference, "note": f"{measured.get('backend')}"
                         + (", noisy" if measured.get("noisy") else "")})
    return pd.DataFrame(rows)


def sensitivity_frame(pieces: Pieces, request: OverviewRequest, top: int = TOP_LAYERS) -> pd.DataFrame:
    """The ``top`` most sensitive layers (each once, by its most damaging chosen format), with every chosen
    format's score for them."""
    records = [r for s in request.schemes for r in pieces.sensitivity.get(s.label, [])]
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame(records)
    worst = frame.groupby("layer")["score"].max().sort_values(ascending=False).head(top)
    return frame[frame["layer"].isin(worst.index)].assign(
        rank=lambda f: f["layer"].map({layer: i for i, layer in enumerate(worst.index)})).sort_values("rank")


def panel_figures(pieces: Pieces, request: OverviewRequest, verdict: Verdict,
                  grids: overview.LayerGrids | None = None, cache: dict | None = None) -> dict[str, go.Figure | None]:
    """The four panels (None where their piece is not there yet): accuracy, memory, speed, sensitivity (+ the
    weight histogram of the most sensitive layer).

    With ``cache`` (a dict kept beside ``pieces`` for this request) a figure is rebuilt only when what it draws
    changed: the schemes its pieces hold (a scheme's record never changes once known), the bound, the layer.
    Building a figure costs far more than drawing it, and the page redraws on every result that arrives.
    """
    target = request.target
    labels = (*(s.label for s in request.schemes), overview.REFERENCE.label)

    def held(found: dict, drawn: Callable[[dict], bool] = bool) -> tuple[str, ...]:
        # Lookups by label only: a worker thread may be adding results to these dicts meanwhile.
        return tuple(label for label in labels if label in found and drawn(found[label]))

    def accuracy() -> go.Figure | None:
        frame = accuracy_frame(pieces, request)
        return None if frame.empty else charts.accuracy_size_front(frame, verdict.loss.title, verdict.bound)

    def memory() -> go.Figure | None:
        frame = memory_frame(pieces, request)
        return None if frame.empty else charts.memory_on_target(frame, target.memory_bytes, target.name)

    def speeds() -> go.Figure | None:
        frame = speed_frame(pieces, request)
        return None if frame.empty else charts.speed_predicted_and_measured(frame, verdict.speed_unit, target.name)

    def sensitivity() -> go.Figure | None:
        frame = sensitivity_frame(pieces, request)
        return None if frame.empty else charts.sensitivity_top_layers(frame)

    def histogram() -> go.Figure | None:
        return None if grids is None else charts.weight_grids(grids.values, grids.grids, f"Weights of {grids.layer}")

    panels = {  # what each figure draws, and how to build it
        "accuracy": ((held(pieces.sweep), verdict.loss.title, verdict.bound), accuracy),
        "memory": (held(pieces.memory), memory),
        "speed": ((held(pieces.predicted), held(pieces.measured, lambda r: bool(r.get("speed"))),
                   verdict.speed_unit), speeds),
        "sensitivity": (held(pieces.sensitivity), sensitivity),
        "histogram": (None if grids is None else grids.layer, histogram),
    }
    cache = {} if cache is None else cache
    for panel, (drawn, build) in panels.items():
        if panel not in cache or cache[panel][0] != drawn:
            cache[panel] = (drawn, build())
    return {panel: cache[panel][1] for panel in panels}


# --- one self-contained HTML file ---------------------------------------------------------------------------


def overview_html(loaded_name: str, request: OverviewRequest, verdict: Verdict,
                  figures: dict[str, go.Figure | None], notes: Sequence[str] = ()) -> str:
    """The Overview as one HTML file: the verdict in words, the rule, the four panels (plotly.js inline once)."""
    from qlab import __version__
    from qlab.store.report import _STYLE, _Charts

    title = f"qlab overview: {loaded_name} on {request.target.name}"
    chart = _Charts()
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">Generated {datetime.now(UTC).isoformat(timespec="seconds")} by qlab '
             f"{html.escape(__version__)}. Formats: {html.escape(', '.join(s.label for s in request.schemes))}; "
             f"evaluated on {request.spec.tokens} tokens of {html.escape(request.spec.text_name)}.</p>",
             f"<h2>{html.escape(verdict.headline)}</h2>",
             "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in details(verdict)) + "</ul>",
             f'<p><b>Rule:</b> {html.escape(verdict.rule)}</p>']
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    titles = {"accuracy": "Accuracy against size", "memory": "Memory on the target",
              "speed": "Speed: predicted on the target, measured here", "sensitivity": "Most sensitive layers",
              "histogram": "Weights of the most sensitive layer with each format's grid"}
    for key, figure in figures.items():
        if figure is not None:
            parts.append(chart.div(titles[key], figure))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


_live_jobs: weakref.WeakSet[OverviewJob] = weakref.WeakSet()


@atexit.register
def stop_live_jobs() -> None:
    """Cancel the workers still running and wait for them. At interpreter exit: a daemon thread caught inside a
    torch kernel while Python finalizes aborts the whole process (std::terminate), exit status lost. After each
    test: a page test's job would otherwise go on measuring beside the tests that follow."""
    jobs = [job for job in list(_live_jobs) if job.alive]
    for job in jobs:
        job.cancel(by_user=False)
    for job in jobs:
        job.wait(EXIT_WAIT_S)
