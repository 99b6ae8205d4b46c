"""Tables and a self-contained HTML report from stored runs: settings, versions, results, charts, memory verdicts.

The HTML embeds plotly.js once (inline, with the first chart) so the file opens offline and can be mailed or
attached to a document; everything shown is read from the store, nothing is recomputed.

Over 500 lines on purpose: each section of the report (sweep, sensitivity, speed, memory, overview) is a few
dozen lines of the same table-and-figure shape, and splitting them would scatter one document's layout over
several files.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
import plotly.graph_objects as go

from qlab import charts
from qlab.backends import speed
from qlab.store.runs import SUMMARY_KIND, StoredRun, stored_sensitivity

# Metrics drawn per model kind, with whether the chart uses a log axis (KLD spans decades).
CHART_METRICS: tuple[tuple[str, bool], ...] = (
    ("kld_mean", True), ("top1_agreement", False), ("ppl", False),
    ("cosine_mean", False), ("retrieval_agreement", False),
)
TABLE_COLUMNS = ("label", "bits_per_weight", "size_bytes", "ppl", "kld_mean", "kld_p99", "top1_agreement",
                 "cosine_mean", "cosine_min", "retrieval_agreement", "seconds")
# Columns a comparison lines up run against run (sizes and every accuracy metric).
COMPARE_COLUMNS = ("bits_per_weight", "size_bytes", *(m for m in charts.METRICS))


# Spreadsheets run a cell that starts with one of these as a formula (=HYPERLINK, =cmd|...): OWASP's CSV injection.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value):
    """``value`` as a spreadsheet shows it without running it: a string starting like a formula gets a leading
    apostrophe (a plain number such as ``-0.5`` stays as it is)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_text(frame: pd.DataFrame) -> str:
    """``frame`` as CSV with nested values as JSON and every text cell and header passed through ``csv_cell``:
    stored labels and imported keys are data, never formulas. Lines end in CRLF (RFC 4180), so a cell holding a
    bare CR is quoted too instead of starting a row of its own."""
    cells = frame.map(lambda v: csv_cell(json.dumps(v) if isinstance(v, list | dict) else v))
    return cells.rename(columns=lambda c: csv_cell(str(c))).to_csv(index=False, lineterminator="\r\n")


# What Streamlit's markdown would turn into something else: emphasis, code, links and images ([), HTML and
# autolinks (<), LaTeX ($), entities (&); a colon or @ before a non-space (autolinks ://, emails, :red[...],
# :material/icon: and emoji); "www." autolinks; a block marker at the start (# > - + 1.).
_MARKDOWN_SPECIAL = re.compile(r"[\\`*_~\[\]<>$&]|[:@](?=\S)|(?i:(?<=www))\.|^[#+-]")
_ORDERED_ITEM = re.compile(r"^(\d{1,9})([.)])(?=\s|$)")


def markdown_text(text: object) -> str:
    """``text`` (a stored label, model name, file name) for a Streamlit markdown element, shown as the
    characters it is: markdown's active characters backslash-escaped and newlines flattened, so no image is
    fetched, no link, autolink, emoji, colour or formula is made and no formatting changes."""
    escaped = _MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(), " ".join(str(text).split()))
    return _ORDERED_ITEM.sub(r"\1\\\2", escaped)


def chart_text(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its text cells ready for plotly, which reads ``<a href>``, ``<span style>`` and entities
    in names, ticks and hover text: ``&``, ``<`` and ``>`` become entities, shown as themselves."""
    def inert(value):
        return html.escape(value, quote=False) if isinstance(value, str) else value

    text = [c for c in frame if not pd.api.types.is_numeric_dtype(frame[c])]
    return frame.assign(**{c: frame[c].map(inert) for c in text}) if text else frame


def run_name(run: StoredRun) -> str:
    """Short unique-enough name for legends and column headers: id prefix, model, date."""
    return f"{run.id[:6]} {run.model} {run.created_at[:10]}"


def results_frame(runs: Sequence[StoredRun], kind: str = "sweep") -> pd.DataFrame:
    """One row per stored result of ``kind`` across runs, with ``run`` and ``run_id`` columns."""
    frames = [pd.DataFrame(run.records(kind)).assign(run=run_name(run), run_id=run.id)
              for run in runs if run.records(kind)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def chart_metrics(frame: pd.DataFrame) -> list[tuple[str, bool]]:
    """The (metric, log axis) pairs worth drawing for these rows."""
    return [(metric, log) for metric, log in CHART_METRICS if metric in frame and frame[metric].notna().any()]


def side_by_side(frame: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Rows of several runs (a ``run`` column) lined up by ``keys``: for each metric, one column per run and
    the delta of each later run against the first (``Δ metric [run]``); rows missing from a run are left empty."""
    if frame.empty:
        return frame
    keys, names = list(keys), list(dict.fromkeys(frame["run"]))
    metrics = [m for m in metrics if m in frame and pd.to_numeric(frame[m], errors="coerce").notna().any()]
    numeric = frame.assign(**{m: pd.to_numeric(frame[m], errors="coerce") for m in metrics})
    wide = numeric.pivot_table(index=keys, columns="run", values=metrics, aggfunc="last", sort=False, dropna=False)
    order = pd.MultiIndex.from_frame(frame[keys].drop_duplicates()) if len(keys) > 1 else \
        pd.Index(frame[keys[0]].drop_duplicates(), name=keys[0])
    columns: dict[str, pd.Series] = {}
    for metric in metrics:
        for name in names:
            if (metric, name) in wide:
                columns[f"{metric} [{name}]"] = wide[(metric, name)]
        reference = names[0]
        for name in names[1:]:
            if (metric, name) in wide and (metric, reference) in wide:
                columns[f"Δ {metric} [{name}]"] = wide[(metric, name)] - wide[(metric, reference)]
    table = pd.DataFrame(columns, index=wide.index).reindex(order)
    return table.reset_index()


def comparison_table(runs: Sequence[StoredRun]) -> pd.DataFrame:
    """Sweep schemes (by label) as rows; for each metric, one column per run and the delta of each later run
    against the first (``Δ metric [run]``). Schemes missing from a run are left empty."""
    return side_by_side(results_frame(runs), ["label"], COMPARE_COLUMNS)


def comparison_caveats(runs: Sequence[StoredRun]) -> list[str]:
    """What differs between runs besides the schemes, so a delta is not read as a like-for-like change."""
    checks = (("model", lambda r: r.meta.model), ("model weights (SHA-256)", lambda r: r.meta.model_sha256),
              ("evaluation text (SHA-256)", lambda r: r.meta.text_sha256), ("token budget", lambda r: r.meta.tokens),
              ("qlab version", lambda r: r.meta.environment.get("qlab")),
              ("torch version", lambda r: r.meta.environment.get("torch")),
              ("transformers version", lambda r: r.meta.environment.get("transformers")))
    caveats = []
    for what, read in checks:
        values = list(dict.fromkeys(str(read(r)) for r in runs))
        if len(values) > 1:
            caveats.append(f"The runs differ in {what}: {', '.join(v[:16] for v in values)}.")
    return caveats


def settings_table(run: StoredRun) -> pd.DataFrame:
    """What was run and on what: one (setting, value) row each, schemes spelt out in full."""
    meta = run.meta
    schemes = [s.get("format", "?") for s in run.schemes()]
    first_scaled = next((s for s in run.schemes() if s.get("format") not in ("fp32", "fp16", "bf16")), None)
    rows = [("run id", run.id), ("kind", run.kind), ("status", run.status), ("started (UTC)", run.created_at),
            ("finished (UTC)", run.finished_at or "-"),
            ("duration (s)", "-" if run.seconds is None else f"{run.seconds:.1f}"),
            ("model", meta.model), ("model SHA-256 (weight files)", meta.model_sha256 or "-"),
            ("hardware target", meta.hardware or "-"), ("evaluation text", meta.text_name or "-"),
            ("text SHA-256", meta.text_sha256 or "-"), ("token budget", meta.tokens),
            ("random-draw number (repeats the same draws)", meta.seed), ("formats", ", ".join(schemes) or "-")]
    if first_scaled:
        rows.append(("scheme settings", json.dumps({k: v for k, v in first_scaled.items() if k != "format"})))
    other = {k: v for k, v in meta.settings.items() if k != "schemes"}
    rows += [(key.replace("_", " "), json.dumps(value) if not isinstance(value, str) else value)
             for key, value in other.items()]
    if run.error:
        rows.append(("error", run.error))
    return pd.DataFrame(rows, columns=["setting", "value"]).astype({"value": str})


def environment_table(run: StoredRun) -> pd.DataFrame:
    return pd.DataFrame([(k, str(v)) for k, v in run.meta.environment.items()], columns=["component", "version"])


def memory_frame(run: StoredRun) -> pd.DataFrame:
    return pd.DataFrame(run.records("memory"))


def verdict_table(run: StoredRun) -> pd.DataFrame:
    """Fit verdicts of stored memory plans: one row per (scheme, target)."""
    rows = []
    for record in run.records("memory"):
        for target in record.get("targets", []):
            rows.append({"scheme": record.get("scheme"), "context_tokens": record.get("context_tokens"),
                         "batch": record.get("batch"), "target": target.get("hardware_id"),
                         "fits": target.get("fits"), "total_GB": target.get("total_bytes", 0) / 1e9,
                         "memory_GB": target.get("memory_bytes", 0) / 1e9,
                         "headroom_GB": target.get("headroom_bytes", 0) / 1e9,
                         "max_context": target.get("max_context"), "max_batch": target.get("max_batch"),
                         "gpus_needed": target.get("gpus_needed")})
    return pd.DataFrame(rows)


def run_figures(run: StoredRun, frames: RunFrames | None = None) -> list[tuple[str, go.Figure]]:
    """The charts of one run, as the dashboard draws them: size vs each accuracy metric; memory stacks;
    sensitivity, mixes and speed. ``frames``: the run's ``run_frames`` when the caller has them already."""
    frames = frames or run_frames(run)
    figures = []
    frame = chart_text(frames.sweep)
    if not frame.empty:
        for metric, log in chart_metrics(frame):
            figures.append((charts.metric_title(metric), charts.size_vs_accuracy(frame, metric, log)))
    plans = frames.memory
    if not plans.empty and set(charts.MEMORY_COMPONENTS) <= set(plans):
        first = plans.iloc[0]
        figures.append((f"Memory on {first['hardware']}", charts.memory_stack(
            chart_text(plans), int(first["memory_bytes"]), html.escape(str(first["hardware"]), quote=False))))
    return figures + _kind_figures(frames)


# --- sensitivity, recommendation and speed runs ---------------------------------------------------------------

# Result kinds drawn with their own layout (the rest are tabulated as they are).
LAID_OUT_KINDS = ("sweep", "memory", "sensitivity_linear", "sensitivity_block", "mix", "recommendation", "bench",
                  SUMMARY_KIND)
SENSITIVITY_COLUMNS = ("layer", "layer_type", "block", "label", "bits_per_weight", "estimated_delta", "block_delta",
                       "linear_delta", "predicted_delta", "relative_mse", "sqnr_db", "weight_kurtosis",
                       "input_outlier_channels")
BENCH_COLUMNS = ("backend", "format", "twin", "prefill_ms", "decode_tokens_per_s", "decode_tokens_per_s_spread_pct",
                 "sentences_per_s", "speedup_vs_fp32", "roofline_fraction", "kld_mean", "twin_kld_mean",
                 "cosine_mean", "twin_cosine_mean", "agrees_with_twin", "size_bytes", "peak_memory_bytes", "threads")
MIX_COLUMNS = ("label", "kind", "bits_per_weight", "size_bytes", "kld_mean", "cosine_mean", "error",
               "predicted_error", "seconds")


def sensitivity_frame(run: StoredRun) -> tuple[pd.DataFrame, pd.DataFrame, str | None]:
    """(rows per linear and scheme, end-to-end units, the measure to rank by) of a stored sensitivity or
    recommendation run; empty frames when it holds none."""
    stored = stored_sensitivity(run)
    if stored is None:
        return pd.DataFrame(), pd.DataFrame(), None
    frame = pd.DataFrame(stored.rows())
    measure = next((m for m in charts.SENSITIVITY_MEASURES if m in frame and frame[m].notna().any()), None)
    return frame, pd.DataFrame(stored.blocks), measure


def sensitivity_table(frame: pd.DataFrame, measure: str, top: int | None = None) -> pd.DataFrame:
    """Linears ranked most sensitive first by ``measure`` (SQNR: lowest first)."""
    ranked = frame.sort_values(measure, ascending=measure == "sqnr_db")
    return ranked[[c for c in SENSITIVITY_COLUMNS if c in frame]].head(top)


def bench_frame(run: StoredRun) -> pd.DataFrame:
    """The speed rows of a bench run (one per backend), without the sweep-benchmark summary."""
    return pd.DataFrame([r for r in run.records("bench") if "backend" in r])


def benchmark_summary(run: StoredRun) -> pd.DataFrame:
    """The timing summary of a ``bench sweep`` run (one FP32 evaluation vs the sweep, peak RSS), scalars only."""
    frame = pd.DataFrame([r for r in run.records("bench") if "backend" not in r])
    return frame[[c for c in frame if frame[c].map(lambda v: not isinstance(v, list | dict)).all()]]


def bench_table(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[c for c in BENCH_COLUMNS if c in frame and frame[c].notna().any()]]


def _failed(row: dict) -> str | None:
    """A bench row's error message, if it has one (a frame fills missing ones with NaN)."""
    error = row.get("error")
    return error if isinstance(error, str) and error else None


def bench_notes(frame: pd.DataFrame) -> list[str]:
    """'backend: why' for each backend that was not measured (unavailable here, or failed)."""
    notes = []
    for row in frame.to_dict("records"):
        reason = row.get("reason") if isinstance(row.get("reason"), str) else None
        if row.get("available") is False or _failed(row):
            notes.append(f"{row['backend']}: {reason or _failed(row) or 'not available'}")
    return notes


def bench_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Measured backends as ``charts.speed_tradeoff`` points (speed, error, size, Pareto front)."""
    rows = [r for r in frame.to_dict("records") if r.get("available") is True and not _failed(r)
            and pd.notna(speed.speed_of(r)) and pd.notna(speed.error_of(r))]
    front = speed.pareto_front(rows)
    return pd.DataFrame([{"label": r["backend"], "library": r.get("library", "?"), "speed": speed.speed_of(r),
                          "error": speed.error_of(r), "size_bytes": r.get("size_bytes") or 0, "source": "measured",
                          "pareto": on_front} for r, on_front in zip(rows, front, strict=True)])


def recommendation_summary(run: StoredRun) -> list[tuple[str, str]]:
    """(title, one line) per stored recommendation: its plan's label, then bits/weight, size, layers per format."""
    found = []
    for record in run.records("recommendation"):
        counts = pd.Series(record.get("assignment", {}), dtype=object).value_counts()
        found.append((f"Recommendation: {record.get('label')}",
                      f"{record.get('bits_per_weight', 0):.3f} bits/weight, {record.get('size_bytes', 0) / 1e6:.2f} "
                      "MB; " + ", ".join(f"{n} layers {fmt}" for fmt, n in counts.items())))
    return found


@dataclass(frozen=True, eq=False)
class RunFrames:
    """The tables of one stored run, built once (``run_frames``) and shared by its tables, its charts and the
    comparisons it takes part in: a History rerun or a report reads each run's records once."""

    run: StoredRun
    sweep: pd.DataFrame
    memory: pd.DataFrame
    sensitivity: pd.DataFrame  # rows per linear and scheme (``sensitivity_frame``)
    blocks: pd.DataFrame  # end-to-end units
    measure: str | None  # the sensitivity measure to rank by; None without sensitivity records
    mixes: pd.DataFrame
    bench: pd.DataFrame  # speed rows, one per backend
    benchmark: pd.DataFrame  # a ``bench sweep`` timing summary


def run_frames(run: StoredRun) -> RunFrames:
    sensitivity, blocks, measure = sensitivity_frame(run)
    return RunFrames(run, pd.DataFrame(run.records("sweep")), memory_frame(run), sensitivity, blocks, measure,
                     pd.DataFrame(run.records("mix")), bench_frame(run), benchmark_summary(run))


def _all_frames(runs: Sequence[StoredRun], frames: Sequence[RunFrames] | None) -> list[RunFrames]:
    return list(frames) if frames is not None else [run_frames(run) for run in runs]


def _kind_figures(frames: RunFrames) -> list[tuple[str, go.Figure]]:
    figures = []
    frame, blocks, measure = chart_text(frames.sensitivity), frames.blocks, frames.measure
    if measure:
        title = charts.SENSITIVITY_MEASURES[measure][0]
        figures.append((f"Sensitivity: {title}", charts.sensitivity_heatmap(frame, measure)))
        figures.append((f"Sensitivity by layer type: {title}", charts.sensitivity_by_type(frame, measure)))
        if not blocks.empty:
            figures.append(("End-to-end delta per unit", charts.block_deltas(chart_text(blocks),
                                                                             str(blocks["metric"].iloc[0]))))
    mixes = frames.mixes
    if not mixes.empty:
        figures.append(("Mixed precision vs uniform formats (measured)",
                        charts.mix_pareto(chart_text(mixes), str(mixes["metric"].iloc[0]))))
    points = chart_text(bench_points(frames.bench))
    if not points.empty:
        lm = frames.bench["kind"].eq("causal-lm").any()
        figures.append(("Accuracy vs speed vs size (measured on the run's machine)", charts.speed_tradeoff(
            points, "decode_tokens_per_s" if lm else "sentences_per_s",
            charts.ERROR_TITLES["kld_mean" if lm else "cosine_mean"])))
    return figures


def _kind_tables(frames: RunFrames) -> str:
    parts = []
    frame, blocks, measure = frames.sensitivity, frames.blocks, frames.measure
    if measure:
        parts.append(f"<h3>Most sensitive linears (top 30 by {html.escape(measure)})</h3>"
                     + _table(sensitivity_table(frame, measure, 30)))
        if not blocks.empty:
            parts.append("<h3>End-to-end units</h3>" + _table(blocks[["name", "label", "value", "delta", "seconds"]]))
    mixes = frames.mixes
    if not mixes.empty:
        parts.append("<h3>Measured plans</h3>" + _table(mixes[[c for c in MIX_COLUMNS if c in mixes]]))
    for title, text in recommendation_summary(frames.run):
        parts.append(f"<h3>{html.escape(title)}</h3><p>{html.escape(text)}</p>")
    if not frames.bench.empty:
        parts.append("<h3>Speed (measured)</h3>" + _table(bench_table(frames.bench)))
    summary = frames.benchmark
    if not summary.empty:
        parts.append("<h3>Sweep benchmark</h3>" + _table(summary.T.reset_index().set_axis(["field", "value"], axis=1),
                                                        "kv"))
    return "".join(parts)


def comparison_figures(frame: pd.DataFrame) -> list[tuple[str, go.Figure]]:
    """One overlaid chart per metric for sweep rows of several runs (``results_frame``); none for fewer than two."""
    if frame.empty or frame["run"].nunique() < 2:
        return []
    return [(charts.metric_title(metric), charts.compare_runs(chart_text(frame), metric, log))
            for metric, log in chart_metrics(frame)]


# --- side by side of speed and sensitivity runs ------------------------------------------------------------------

# Bench columns compared run against run: speed, then accuracy against FP32, then memory; (column, log axis).
BENCH_COMPARE_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("decode_tokens_per_s", False), ("sentences_per_s", False), ("prefill_ms", False), ("kld_mean", True),
    ("cosine_mean", False), ("size_bytes", False), ("peak_memory_bytes", False))
BENCH_TITLES = {"decode_tokens_per_s": "Decode (tokens/s)", "sentences_per_s": "Throughput (sentences/s)",
                "prefill_ms": "Prefill (ms)", "kld_mean": "KL divergence to the base model (nats/token)",
                "cosine_mean": "Cosine similarity to the base model", "size_bytes": "Size (bytes)",
                "peak_memory_bytes": "Peak memory (bytes)"}


@dataclass(frozen=True)
class Comparison:
    """Several runs of one kind side by side: the table (Δ columns against the first run) and overlaid charts."""

    kind: str  # "sweep", "bench" or "sensitivity"
    title: str
    note: str
    table: pd.DataFrame = field(hash=False)
    # Sweeps: none (a reader draws them from ``rows`` with ``comparison_figures``, or its own metric picker).
    figures: tuple[tuple[str, go.Figure], ...] = field(default=(), hash=False)
    rows: pd.DataFrame = field(default_factory=pd.DataFrame, hash=False)  # the long rows lined up (a ``run`` column)


def bench_comparison(runs: Sequence[StoredRun], frames: Sequence[RunFrames] | None = None) -> Comparison | None:
    """Speed runs side by side, one row per backend (None with fewer than two runs holding speed rows)."""
    found = [f.bench.assign(run=run_name(f.run)) for f in _all_frames(runs, frames) if not f.bench.empty]
    if len(found) < 2:
        return None
    frame = pd.concat(found, ignore_index=True)
    table = side_by_side(frame, ["backend"], [c for c, _ in BENCH_COMPARE_COLUMNS])
    figures = tuple((BENCH_TITLES[column], charts.compare_bench_runs(chart_text(frame), column, BENCH_TITLES[column],
                                                                     log))
                    for column, log in BENCH_COMPARE_COLUMNS[:5] if f"{column} [{frame['run'].iloc[0]}]" in table)
    return Comparison("bench", "Speed runs side by side", f"One row per backend; Δ columns: each run minus the "
                      f"first ({frame['run'].iloc[0]}). Speeds are only comparable on the same machine.", table,
                      figures, frame)


def sensitivity_comparison(runs: Sequence[StoredRun],
                           frames: Sequence[RunFrames] | None = None) -> Comparison | None:
    """Sensitivity (or recommendation) runs side by side, one row per (linear, scheme), on the first measure
    every run holds (None with fewer than two such runs)."""
    found = [(f.run, f.sensitivity) for f in _all_frames(runs, frames) if f.measure]
    if len(found) < 2:
        return None
    frame = pd.concat([f.assign(run=run_name(run)) for run, f in found], ignore_index=True)
    measure = next((m for m in charts.SENSITIVITY_MEASURES
                    if all(m in f and f[m].notna().any() for _, f in found)), None)
    if measure is None:
        return None
    table = side_by_side(frame, ["layer", "label"], [measure])
    title, log = charts.SENSITIVITY_MEASURES[measure]
    return Comparison("sensitivity", f"Sensitivity runs side by side: {measure}",
                      f"One row per linear and scheme ({title}); Δ: each run minus the first "
                      f"({frame['run'].iloc[0]}).", table,
                      ((f"{title}, per linear", charts.compare_sensitivity_runs(chart_text(frame), measure, title,
                                                                                log)),), frame)


def comparisons(runs: Sequence[StoredRun], frames: Sequence[RunFrames] | None = None) -> list[Comparison]:
    """Every side-by-side view the selected runs allow: sweeps by scheme, speed runs by backend, sensitivity
    runs by linear. ``frames``: the runs' ``run_frames`` when the caller has them already. The sweep view
    carries its rows, not charts: ``comparison_figures(comparison.rows)`` draws them where they are shown."""
    frames = _all_frames(runs, frames)
    found = []
    rows = results_frame([f.run for f in frames])
    if not rows.empty and rows["run"].nunique() > 1:
        found.append(Comparison("sweep", "Sweeps side by side", f"Δ columns: each run minus the first "
                                f"({rows['run'].iloc[0]}), scheme by scheme.",
                                side_by_side(rows, ["label"], COMPARE_COLUMNS), (), rows))
    return found + [c for c in (bench_comparison(runs, frames), sensitivity_comparison(runs, frames)) if c is not None]


# --- HTML ------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.kv td { text-align: left; } .scroll { overflow-x: auto; } .note { color: #666; font-size: .9em; } figure { margin: 0 0 1.5em; }
"""


class _Charts:
    """Turns figures into <div>s; only the first carries plotly.js (inline), the rest reuse it."""

    def __init__(self) -> None:
        self.count = 0

    def div(self, title: str, figure: go.Figure) -> str:
        body = figure.to_html(full_html=False, include_plotlyjs=self.count == 0,
                              default_height="460px", config={"displaylogo": False})
        self.count += 1
        return f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption>{body}</figure>'


def _table(frame: pd.DataFrame, css: str = "") -> str:
    if frame.empty:
        return '<p class="note">(none)</p>'
    table = frame.to_html(index=False, classes=css, border=0, na_rep="", float_format=lambda v: f"{v:.4g}",
                          escape=True)
    return f'<div class="scroll">{table}</div>'  # wide comparisons scroll instead of overflowing the page


def results_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The sweep columns worth reading, size in MB."""
    columns = [c for c in TABLE_COLUMNS if c in frame]
    shown = frame[columns].copy()
    if "size_bytes" in shown:
        shown["size_bytes"] = shown["size_bytes"] / 1e6
        shown = shown.rename(columns={"size_bytes": "size (MB)"})
    return shown


def _other_results(run: StoredRun) -> str:
    """Results of kinds this report has no layout for: their scalar fields."""
    parts = []
    for kind in dict.fromkeys(r.kind for r in run.results if r.kind not in LAID_OUT_KINDS):
        frame = pd.DataFrame(run.records(kind))
        scalars = [c for c in frame if frame[c].map(lambda v: not isinstance(v, list | dict)).all()]
        parts.append(f"<h3>{html.escape(kind)} results</h3>" + _table(frame[scalars]))
    return "".join(parts)


def render_html(runs: Sequence[StoredRun], title: str | None = None) -> str:
    """A standalone HTML page for one run, or a side-by-side comparison of several followed by each run."""
    from qlab import __version__

    runs = list(runs)
    title = title or ("qlab report: " + (run_name(runs[0]) if len(runs) == 1 else f"{len(runs)} runs compared"))
    chart = _Charts()
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">Generated {datetime.now(UTC).isoformat(timespec="seconds")} by qlab '
             f"{html.escape(__version__)} from stored results; nothing was recomputed. KL divergence is in nats "
             "per token against the base model in its own precision; sizes are the whole model as stored, scales "
             "included.</p>"]
    frames = [run_frames(run) for run in runs]
    if len(runs) > 1:
        parts.append("<h2>Comparison</h2>")
        parts += [f'<p class="note"><b>Note:</b> {html.escape(c)}</p>' for c in comparison_caveats(runs)]
        found = comparisons(runs, frames)
        if not found:
            parts.append('<p class="note">These runs hold no results of one kind to line up; each is shown '
                         "below.</p>")
        for comparison in found:
            parts.append(f"<h3>{html.escape(comparison.title)}</h3>")
            parts.append(f'<p class="note">{html.escape(comparison.note)}</p>' + _table(comparison.table))
            figures = comparison_figures(comparison.rows) if comparison.kind == "sweep" else comparison.figures
            parts += [chart.div(t, f) for t, f in figures]
    for run, run_tables in zip(runs, frames, strict=True):
        parts.append(f"<h2>Run {html.escape(run_name(run))}</h2>")
        parts.append("<h3>Settings</h3>" + _table(settings_table(run), "kv"))
        parts.append("<h3>Versions</h3>" + _table(environment_table(run), "kv"))
        if not run_tables.sweep.empty:
            parts.append("<h3>Results</h3>" + _table(results_table(run_tables.sweep)))
        memory = run_tables.memory
        if not memory.empty:
            components = [c for c in ("scheme", "context_tokens", "batch", "weights_bytes", "kv_cache_bytes",
                                      "activations_bytes", "overhead_bytes", "total_bytes") if c in memory]
            parts.append("<h3>Memory plan</h3>" + _table(memory[components]))
            parts.append("<h3>Verdicts</h3>" + _table(verdict_table(run)))
        parts.append(_kind_tables(run_tables))
        parts.append(_other_results(run))
        parts += [chart.div(t, f) for t, f in run_figures(run, run_tables)]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")
