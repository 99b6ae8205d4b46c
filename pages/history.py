"""History page: stored runs; open one, compare several side by side, export, report, re-run, import, delete."""

import json
import re
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from pages import common
from qlab import charts, views
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme
from qlab.models import hardware
from qlab.models import loading as models
from qlab.models.evaluate import DEFAULT_TEXT_NAME
from qlab.store import Store, StoredRun, report, scheme_export

KIND_NAMES = {"sweep": "sweep", "sensitivity": "sensitivity analysis", "recommend": "mixed-precision plan",
              "bench": "speed measurement", "memory": "memory plan", "roofline": "speed prediction",
              "sensitivity_quick": "quick sensitivity"}


def kind_name(kind: str) -> str:
    """A run kind in words (an imported run may bring a kind this version does not know: shown as stored)."""
    return KIND_NAMES.get(kind, kind)


def hardware_name(hardware_id: object) -> object:
    """A run's target in words; "this machine" of a run may be another machine's (an imported run). A run
    without a target (a missing cell) stays missing."""
    if not isinstance(hardware_id, str) or not hardware_id:
        return hardware_id
    if hardware_id == hardware.THIS_MACHINE_ID:
        return "the machine it ran on"
    try:
        return hardware.get(hardware_id).name
    except QlabError:  # an imported run may name a target this version's catalog does not have
        return hardware_id


common.page_setup()
st.title("History")
store = Store()
st.caption(f"Every finished result (sweep schemes, sensitivity units, mixes, speed rows, memory plans) is saved "
           f"as it completes, from this dashboard and from headless runs (`python -m qlab sweep|sensitivity|"
           f"recommend|bench|memory ... --db PATH`), in `{store.path}` (set `QLAB_DB` to use another file). "
           "Charts and tables here are read back from the store, never recomputed.")
read_only = not store.writable()
if read_only:
    st.info(f"`{store.path}` is read-only: browse, compare and export its runs here; to import or delete, set "
            "`QLAB_DB` to a writable file (importing this one into it copies every run).")


def import_upload() -> None:
    upload = st.session_state.get("history_upload")
    if upload is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(upload.name).name
        path.write_bytes(upload.getvalue())
        try:
            ids = store.import_file(path, upload.name)  # messages name the upload, not the server's copy
        except QlabError as error:
            st.session_state["history_message"] = ("error", str(error))
            return
    st.session_state["history_message"] = ("success", f"Imported {len(ids)} run(s) from "
                                                      f"{report.markdown_text(upload.name)}.")
    st.session_state["history_selected"] = ids


with st.expander("Import runs (from a GPU server or a colleague)"):
    st.caption("A `python -m qlab runs export` JSON, a copied `runs.sqlite`, or the JSON that "
               "`python -m qlab sweep --json out.json` writes. Importing the same run twice adds nothing.")
    st.file_uploader("Runs file", type=["json", "sqlite", "db"], key="history_upload")
    st.button("Import", key="history_import", on_click=import_upload, disabled=read_only)
kind_of_message, message = st.session_state.pop("history_message", (None, None))
if message:
    getattr(st, kind_of_message)(message)

with common.user_errors():
    summaries = pd.DataFrame(store.list_runs())
if "history_selected" not in st.session_state:  # a shared link: ?runs=id1,id2
    linked = views.params_to_view(st.query_params.to_dict()).get("runs", [])
    known = set(summaries["id"]) if not summaries.empty else set()
    missing = [i for i in linked if i not in known]
    if missing:  # a link made on another machine's database: say so rather than open less than it named
        one = len(missing) == 1
        st.warning(f"{'Run' if one else 'Runs'} {', '.join(missing)} {'is' if one else 'are'} not in "
                   f"`{store.path}`; import {'it' if one else 'them'} first (History → Import).")
    st.session_state["history_selected"] = [i for i in linked if i in known]
if summaries.empty:
    st.info("No stored runs yet: run a sweep on the Quantize page, or import one above.")
    st.stop()

model_column, kind_column, search_column = st.columns([2, 1, 2])
chosen_models = model_column.multiselect("Model", sorted(summaries["model"].unique()), key="history_models")
chosen_kinds = kind_column.multiselect("Kind", sorted(summaries["kind"].unique()), key="history_kinds",
                                      format_func=kind_name)
search = search_column.text_input("Scheme contains", key="history_search", placeholder="int4")
shown = summaries[(summaries["model"].isin(chosen_models) if chosen_models else True)
                  & (summaries["kind"].isin(chosen_kinds) if chosen_kinds else True)
                  & summaries["labels"].str.contains(search, case=False, regex=False)]
common.table(shown[["id", "created_at", "kind", "status", "model", "hardware", "results", "labels", "tokens",
                    "qlab"]].assign(kind=shown["kind"].map(kind_name), hardware=shown["hardware"].map(hardware_name),
                                created_at=shown["created_at"].str[:16].str.replace("T", " ")),
             key="history_table",
             column_config={"id": "run", "qlab": "qlab version", "created_at": st.column_config.TextColumn("started (UTC)"),
                            "labels": st.column_config.TextColumn("schemes", width="large")})

names = {row.id: f"{row.id[:6]} · {kind_name(row.kind)} · {row.model} · {row.created_at[:16].replace('T', ' ')} · "
                 f"{row.results} result(s)" for row in summaries.itertuples()}
options = list(shown["id"])
# An import may name runs that the filters hide, a deletion runs that no longer exist.
st.session_state["history_selected"] = [i for i in st.session_state["history_selected"] if i in names]
options += [i for i in st.session_state["history_selected"] if i not in options]
selected = st.multiselect("Runs to open (pick two or more to compare)", options, key="history_selected",
                          format_func=names.get)
if selected:  # the address names the selection, so it can be shared
    st.query_params.update(views.view_to_params({"runs": selected}))
else:
    st.query_params.pop("runs", None)
if not selected:
    st.info("Pick a run to see its charts and settings, or several to compare them side by side.")
    st.stop()
with common.user_errors():
    runs: list[StoredRun] = [store.get(i) for i in selected]


def run_view(run: StoredRun) -> tuple[dict, list[str]]:
    """The sidebar choices that reproduce a sweep run, and what cannot be reproduced from the sidebar."""
    schemes = [QuantScheme.from_dict(s) for s in run.schemes()]
    view: dict = {"model": run.model, "formats": list(dict.fromkeys(s.format for s in schemes))}
    notes = []
    scaled = [s for s in schemes if s.fmt.scaled]
    if scaled:
        first = scaled[0]
        view |= {"granularity": first.granularity, "group_size": first.group_size, "symmetric": first.symmetric,
                 "calibration": first.calibration}
        if len({(s.granularity, s.group_size, s.symmetric, s.calibration) for s in scaled}) > 1:
            notes.append("the run mixed granularities or calibrations; the sidebar takes the first scheme's.")
        if first.granularity == "group" and first.group_size not in common.GROUP_SIZES:
            notes.append(f"group size {first.group_size} is not offered by the sidebar.")
            view.pop("group_size")
    if run.meta.tokens:
        view["tokens"] = min(max(int(run.meta.tokens), 16), 8192)
    if run.meta.hardware:
        view["hardware"] = run.meta.hardware
    device = run.meta.settings.get("device")
    if device in models.device_choices():
        view["device"] = device
    elif device:  # a GPU server's run re-run here: the sidebar's own choice of device stays
        where = "every GPU of its machine" if device == "auto" else device
        notes.append(f"the run ran on {where}, which this machine does not have; the sidebar's Run on is used.")
    if run.meta.text_name and run.meta.text_name != DEFAULT_TEXT_NAME:
        notes.append(f"the run evaluated '{run.meta.text_name}' (SHA-256 {run.meta.text_sha256[:12]}...); "
                     "paste or upload it again on the Quantize page.")
    return view, notes


def apply_view(view: dict) -> None:
    """Put a view into the sidebar's session state (call before the sidebar is drawn: in a callback)."""
    for key in ("hardware", "formats", "granularity", "group_size", "symmetric", "calibration", "tokens", "device"):
        if key in view:
            st.session_state[key] = view[key]
    if "model" in view:
        bundled = view["model"] in models.bundled_models()
        st.session_state["model_choice"] = view["model"] if bundled else common.OTHER_MODEL
        st.session_state["custom_model"] = "" if bundled else view["model"]


def rerun_settings(run_id: str) -> None:
    # Until pages/common.py offers apply_view (with the shareable-URL wiring), the local one does the same.
    getattr(common, "apply_view", apply_view)(run_view(store.get(run_id))[0])


def show_run(run: StoredRun, frames: report.RunFrames) -> None:
    common.table(report.settings_table(run), key=f"settings_{run.id}")
    st.caption("Versions: " + report.markdown_text(", ".join(
        f"{k} {v}" for k, v in run.meta.environment.items() if k in ("qlab", "torch", "transformers", "python",
                                                                      "machine"))))
    if not frames.sweep.empty:
        common.table(report.results_table(frames.sweep), key=f"results_{run.id}")
    verdicts = report.verdict_table(run)
    if not verdicts.empty:
        common.table(verdicts, key=f"verdicts_{run.id}")
    sensitivity, blocks, measure = frames.sensitivity, frames.blocks, frames.measure
    if measure:
        st.caption(f"Sensitivity: {sensitivity['layer'].nunique()} linears x {sensitivity['label'].nunique()} "
                   f"format(s), {len(blocks)} end-to-end unit(s); ranked by {measure}.")
        common.table(report.sensitivity_table(sensitivity, measure), key=f"sensitivity_{run.id}")
    for title, text in report.recommendation_summary(run):
        st.markdown(f"**{report.markdown_text(title)}**: {report.markdown_text(text)}")
    mixes = frames.mixes
    if not mixes.empty:
        common.table(mixes[[c for c in report.MIX_COLUMNS if c in mixes]], key=f"mix_{run.id}")
    bench = frames.bench
    if not bench.empty:
        common.table(report.bench_table(bench), key=f"bench_{run.id}")
        for note in report.bench_notes(bench):
            st.caption(report.markdown_text(note))
    summary = frames.benchmark
    if not summary.empty:
        common.table(summary, key=f"benchmark_{run.id}")
    for kind in dict.fromkeys(r.kind for r in run.results if r.kind not in report.LAID_OUT_KINDS):
        common.table(pd.DataFrame(run.records(kind)).map(lambda v: json.dumps(v) if isinstance(v, list | dict)
                                                         else v), key=f"{kind}_{run.id}")
    for index, (title, figure) in enumerate(report.run_figures(run, frames)):
        st.markdown(f"**{report.markdown_text(title)}**")
        st.plotly_chart(figure, key=f"chart_{run.id}_{index}")


frames = [report.run_frames(run) for run in runs]  # each run's tables once, for its view and the comparisons
if len(runs) > 1:
    st.subheader(f"{len(runs)} runs side by side")
    kinds = pd.Series([kind_name(run.kind) for run in runs]).value_counts(sort=False)
    if len(kinds) > 1:  # only runs of one kind line up; say which kinds this selection holds
        st.caption(report.markdown_text("This selection compares runs of different kinds: " + ", ".join(
            f"{kind} ({n})" for kind, n in kinds.items()) + "; runs of one kind are lined up below, each run is "
            "shown on its own further down."))
    found = report.comparisons(runs, frames)  # sweeps by scheme, speed runs by backend, sensitivity runs by linear
    if not found:
        st.info("These runs hold no results of one kind to line up (two sweeps, two speed runs or two "
                "sensitivity runs); each is shown below.")
    else:
        for caveat in report.comparison_caveats(runs):
            st.warning(report.markdown_text(caveat))
    for comparison in found:
        if len(found) > 1:
            st.markdown(f"**{report.markdown_text(comparison.title)}**")
        st.caption(report.markdown_text(comparison.note))
        common.table(comparison.table, key=f"comparison_{comparison.kind}")
        if comparison.kind == "sweep":  # the sweep chart offers every metric, on a log axis or not
            frame = comparison.rows
            metrics = report.chart_metrics(frame)
            metric = st.selectbox("Metric", [m for m, _ in metrics], format_func=charts.metric_title,
                                  key="history_metric")
            log_y = st.checkbox("Log scale", value=dict(metrics)[metric], key=f"history_log_{metric}")
            st.plotly_chart(charts.compare_runs(report.chart_text(frame), metric, log_y), key="comparison_chart")
        else:
            for index, (title, figure) in enumerate(comparison.figures):
                st.markdown(f"*{report.markdown_text(title)}*")
                st.plotly_chart(figure, key=f"comparison_{comparison.kind}_chart_{index}")
        st.download_button("Download comparison CSV", report.csv_text(comparison.table),
                           f"qlab-comparison-{comparison.kind}.csv", "text/csv",
                           key=f"download_comparison_{comparison.kind}")
    for run, run_tables in zip(runs, frames, strict=True):
        with st.expander(f"Run {report.markdown_text(report.run_name(run))} ({report.markdown_text(run.status)})"):
            show_run(run, run_tables)
else:
    run = runs[0]
    st.subheader(f"Run {report.markdown_text(report.run_name(run))} ({report.markdown_text(run.status)})")
    show_run(run, frames[0])

st.subheader("Export and share")
left, middle, right = st.columns(3)
left.download_button("HTML report", lambda: report.render_html(runs), "qlab-report.html", "text/html",
                     key="download_report", help="Self-contained: charts, settings, versions, tables.")
middle.download_button("Runs as JSON", lambda: json.dumps(store.export(selected), indent=2),
                       "qlab-runs.json", "application/json", key="download_runs_json",
                       help="Import it elsewhere with `python -m qlab runs import` or on this page.")
right.download_button("Results as CSV", lambda: report.csv_text(report.results_frame(runs, kind=None)),
                      "qlab-results.csv", "text/csv", key="download_runs_csv")
st.caption("This page's address now names the selected runs: share it to open the same comparison "
           "(on a dashboard that reads the same database, or after importing the JSON above).")

# Sweeps, and `bench sweep` runs (kind bench), whose sweep rows carry their schemes too.
sweeps = [r for r in runs if r.schemes() and any(result.kind == "sweep" and result.scheme for result in r.results)]
if sweeps:
    st.subheader("Re-run or export a scheme")
    source = sweeps[0] if len(sweeps) == 1 else next(
        r for r in sweeps if r.id == st.selectbox("Run", [r.id for r in sweeps], format_func=names.get,
                                                  key="history_source"))
    if st.button("Re-run with these settings", key="history_rerun", on_click=rerun_settings, args=(source.id,),
                 help="Sets the sidebar to this run's model, hardware, formats, scheme, token budget and device "
                      "(when this machine has it), then opens the Quantize page."):
        st.switch_page("pages/quantize.py", query_params=views.view_to_params(run_view(source)[0]))
    for note in run_view(source)[1]:
        st.caption("Re-run: " + report.markdown_text(note))
    labels = [r.label for r in source.results if r.scheme]
    if labels:
        label_column, button_column = st.columns([3, 1])
        label = label_column.selectbox("Scheme", labels, key="history_scheme_label")
        scheme = QuantScheme.from_dict(next(r.scheme for r in source.results if r.label == label))
        if button_column.button("Per-layer scheme JSON", key="history_scheme_build",
                                help="Module name -> scheme for every quantized linear: the exact recipe "
                                     "of this simulated quantization. Loads the model."):
            with common.user_errors():
                loaded = common.load_model(source.model)
                st.session_state["history_scheme_json"] = (source.id, label, json.dumps(
                    scheme_export(loaded, scheme), indent=1))
        built = st.session_state.get("history_scheme_json")
        if built and built[:2] == (source.id, label):
            st.download_button("Download scheme JSON", built[2],
                               f"qlab-scheme-{re.sub(r'[^A-Za-z0-9._-]+', '-', label)}.json", "application/json",
                               key="download_scheme")

with st.expander("Delete"):
    confirm = st.checkbox(f"Yes, delete the {len(selected)} selected run(s) and their results",
                          key="history_confirm_delete")
    if st.button("Delete selected runs", key="history_delete", disabled=not confirm or read_only):
        with common.user_errors():
            count = store.delete(selected)
        st.session_state["history_message"] = ("success", f"Deleted {count} run(s).")
        st.rerun()  # the selection drops ids that no longer exist
